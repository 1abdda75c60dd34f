"""``python -m bench relay|baseline ...``: the benchmark server processes (scripts/ on PYTHONPATH)."""

from __future__ import annotations

import argparse

from bench import proc


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("relay", help="serve the Cython relay under uvicorn (uvloop) on a free port")
    p.add_argument("--keepalive", type=float, default=3600.0, help="DERP keepalive interval, s (default 3600)")
    p.add_argument("--relay-path", metavar="DIR", help="import _relay from DIR/_relay (a modified build)")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="trace Python allocations (GET /bench/trace) with this many frames (default off)")
    p.add_argument("--rate-limit", type=int, default=0, help="per-client rate limit, bytes/s (default 0: off)")
    p.add_argument("--rate-burst", type=int, default=0, help="per-client burst, bytes (default: 0.1 s of the rate)")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS with this certificate and key")
    p.add_argument("--mesh-tls", nargs=2, metavar=("CERT", "KEY"),
                   help="serve plain HTTP and, on a second port (READY's third field), HTTPS for mesh links")
    p.add_argument("--mesh-key", metavar="KEY",
                   help="accept mesh peers with this key and mesh with the relays POSTed to /bench/mesh")
    b = sub.add_parser("baseline", help="serve the pure-Python baseline relay on a free port")
    b.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()
    proc.die_with_parent()
    proc.raise_nofile()
    if args.cmd == "relay":
        from bench import relay_server

        if args.relay_path:
            relay_server.use_relay_build(args.relay_path)
        relay_server.serve_relay(args.keepalive, args.tracemalloc, args.relay_path, args.mesh_key,
                                 args.rate_limit, args.rate_burst, tls=args.tls,
                                 mesh_tls=args.mesh_tls)
    else:
        from bench.baseline import serve_baseline

        serve_baseline(args.loop)


if __name__ == "__main__":
    main()

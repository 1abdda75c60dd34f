"""The command-line options bench_relay.py and bench_mesh.py share, and their checks."""

from __future__ import annotations

import argparse


def add_case_options(ap: argparse.ArgumentParser) -> None:
    """Workload of every case: pairs, sizes, modes, timing, windowing, sampling, client processes."""
    ap.add_argument("--pairs", type=int, default=4, help="sender/receiver connection pairs (default 4)")
    ap.add_argument("--sizes", default="100,1000,16000", help="packet sizes in bytes, comma-separated, >= 8")
    ap.add_argument("--modes", default="windowed,flood", help="windowed,flood (default both)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per case (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each case (default 0.5)")
    ap.add_argument("--window", type=int, default=32, help="windowed: packets in flight per sender (default 32)")
    ap.add_argument("--ack-every", type=int, default=8, help="windowed: receiver acks every N packets (default 8)")
    ap.add_argument("--sample-every", type=int, default=8, help="latency: sample every k-th packet (default 8)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--client", choices=("batch", "per-packet"), default="batch",
                    help="batch: senders write whole windows in one write (cheap client, the default); per-packet: "
                         "every packet its own write and receivers parse frame by frame, as Tailscale's derphttp "
                         "client does, so the server sees about one packet per read")


def add_relay_path_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--relay-path", metavar="DIR",
                    help="benchmark a modified relay: import _relay from DIR/_relay (built there with "
                         "'python setup.py build_ext --inplace') instead of the installed one")


def check_case_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse ``--sizes``/``--modes`` into lists and refuse values that cannot run (``ap.error``)."""
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.sizes or any(not 8 <= s <= 65536 for s in args.sizes):
        ap.error("--sizes: each between 8 and 65536 (8 bytes carry the timestamp)")
    if not args.modes or any(m not in ("windowed", "flood") for m in args.modes):
        ap.error("--modes: windowed and/or flood")
    if args.pairs < 1 or args.window < 1 or args.sample_every < 1 or args.seconds <= 0:
        ap.error("--pairs, --window, --sample-every and --seconds must be positive")
    if not 1 <= args.ack_every <= args.window:
        ap.error("--ack-every must be between 1 and --window (else the window deadlocks)")

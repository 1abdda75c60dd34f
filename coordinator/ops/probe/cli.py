"""``coordinator probe``'s command line: options, where the replicas are, exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback

from coordinator.core.errors import one_line
from coordinator.core.health import LATENCY_THRESHOLD
from coordinator.ops.probe.discovery import local_database
from coordinator.ops.probe.model import (
    DEFAULT_SAMPLES,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    PG_URL_ENV,
    SCHEMA,
    THRESHOLD_ENV,
    TOKEN_ENV,
    ProbeUsageError,
)
from coordinator.ops.probe.render import render_text
from coordinator.ops.probe.run import run_probe
from coordinator.ops.probe.tailnet import DEFAULT_THRESHOLD as TAILNET_THRESHOLD
from coordinator.ops.probe.tailnet import TOKEN_ENV as TAILNET_TOKEN_ENV


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's options, for embedding in another parser (e.g. a ``probe`` subcommand)."""
    where = parser.add_argument_group("where the replicas are (one of)")
    where.add_argument("--pg-url", metavar="URL",
                       help="PostgreSQL URL of the deployment [$COORDINATOR_PG_CONNECTION_URL; default: the embedded "
                            "PostgreSQL of the local data directory, if one is running]")
    where.add_argument("--url", metavar="URL", help="one replica's URL (or the load balancer's), with --token")
    parser.add_argument("--token", metavar="TOKEN", help=f"API token for --url [${TOKEN_ENV[0]}]")
    parser.add_argument("--derp-map", metavar="URL|PATH",
                        help="the DERP map whose custom relays to probe (GET /derp/probe, DERP ping) [default: the "
                             "/derpmap/default of --url, else $COORDINATOR_DERP_CONFIG_URL or _PATH, else a replica's]")
    parser.add_argument("--threshold", metavar="DURATION",
                        help=f"the most any figure may be, Go-style (10ms, 1.5ms; a bare number is seconds) "
                             f"[${THRESHOLD_ENV}, default 10ms]")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help=f"samples per figure; the median is judged (default {DEFAULT_SAMPLES})")
    parser.add_argument("--timeout", default="3s", metavar="DURATION",
                        help="per connection attempt and per sample (default 3s)")
    parser.add_argument("--tailnet-token", metavar="TOKEN",
                        help=f"the peer coordinator's token, for the check that an update crosses replicas "
                             f"[${TAILNET_TOKEN_ENV}; with --pg-url: the deployment's stored one]")
    parser.add_argument("--tailnet-threshold", metavar="DURATION",
                        help="the most that update's propagation may take (default 100ms)")
    parser.add_argument("--json", action="store_true", help=f"print the {SCHEMA} JSON document instead of tables")
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--verbose", action="store_true", help="log what the libraries log, tracebacks of internal errors")


def build_parser(prog: str = "coordinator probe") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Measure the latencies an HA deployment depends on, from this host: database and pub/sub "
                    "round trips, each replica's HTTP latency-check and DERP ping, the mesh path between every "
                    "pair of replicas, and the matrix the replicas measure themselves. Exit status 0: all within "
                    "the threshold; 1: a figure over it or a replica unreachable; 2: usage or configuration error.",
    )
    add_arguments(parser)
    return parser


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _setup_logging(verbose: bool) -> None:
    # basicConfig does nothing if the caller (the coordinator CLI, pytest) configured logging.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.CRITICAL, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _durations(args: argparse.Namespace) -> tuple[float, float]:
    """(threshold, timeout) in seconds from the options and the environment; refuses what cannot work."""
    from coordinator.core.values import parse_duration

    if args.threshold is not None:
        threshold = parse_duration(args.threshold, "--threshold")
    elif os.environ.get(THRESHOLD_ENV):
        threshold = parse_duration(os.environ[THRESHOLD_ENV], THRESHOLD_ENV)
    else:
        threshold = LATENCY_THRESHOLD
    timeout = parse_duration(args.timeout, "--timeout")
    if not threshold > 0:
        raise ProbeUsageError("the threshold must be positive")
    if not timeout > 0:
        raise ProbeUsageError("--timeout must be positive")
    if not 1 <= args.samples <= 1000:
        raise ProbeUsageError("--samples must be between 1 and 1000")
    return threshold, timeout


def _database_url(args: argparse.Namespace) -> str | None:
    """Where to find the replicas: --pg-url, else $COORDINATOR_PG_CONNECTION_URL, else (without --url)
    the embedded PostgreSQL of the local data directory, the one `make run` starts."""
    from coordinator.core.settings import load_settings

    if args.pg_url and args.url:
        raise ProbeUsageError("give either --pg-url or --url, not both")
    if args.url:
        return args.pg_url
    pg_url = args.pg_url or _env(PG_URL_ENV)
    if pg_url:
        return pg_url
    data_dir = load_settings().data_path
    pg_url = local_database(data_dir)
    if not pg_url:
        raise ProbeUsageError(f"where are the replicas? give --pg-url (or set {PG_URL_ENV[0]}), or --url with "
                              f"--token (no embedded PostgreSQL is running for data directory {data_dir})")
    return pg_url


def run_from_args(args: argparse.Namespace, prog: str = "coordinator probe") -> int:
    """Run with parsed options (from :func:`add_arguments`); returns the exit status."""
    from coordinator.core.errors import ConfigError
    from coordinator.core.values import parse_duration

    _setup_logging(args.verbose)

    def fail(message: str) -> int:
        print(f"{prog}: {one_line(message)}", file=sys.stderr)
        if args.json:
            print(json.dumps({"schema": SCHEMA, "ok": False, "exit_status": EXIT_USAGE, "error": one_line(message)}))
        return EXIT_USAGE

    try:
        threshold, timeout = _durations(args)
        tailnet_threshold = (parse_duration(args.tailnet_threshold, "--tailnet-threshold")
                             if args.tailnet_threshold is not None else TAILNET_THRESHOLD)
        if not tailnet_threshold > 0:
            raise ProbeUsageError("--tailnet-threshold must be positive")
        pg_url = _database_url(args)
    except (ConfigError, ProbeUsageError) as exc:
        return fail(str(exc))
    token = args.token or _env(TOKEN_ENV)

    try:
        report = asyncio.run(run_probe(pg_url=pg_url, replica_url=None if pg_url else args.url, token=token,
                                       threshold=threshold, samples=args.samples, timeout=timeout,
                                       insecure=args.insecure, derp_map=args.derp_map,
                                       tailnet_token=args.tailnet_token or _env((TAILNET_TOKEN_ENV,)),
                                       tailnet_threshold=tailnet_threshold))
    except ProbeUsageError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug in the probe, not the user's doing
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {one_line(exc)}"
              + ("" if args.verbose else " (--verbose shows the traceback)"), file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_text(report))
    sys.stdout.flush()
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def main(argv: list[str] | None = None, *, prog: str = "coordinator probe") -> int:
    """``coordinator probe [options]``: ``argv`` is the options only (without the program or subcommand)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run_from_args(args, prog)


if __name__ == "__main__":
    sys.exit(main())

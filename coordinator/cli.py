"""``coordinator`` command line: ``server`` runs one replica."""

from __future__ import annotations

import argparse
import logging
import sys

from coordinator import __version__
from coordinator.config import ConfigError, Settings, load_settings, settings_help

log = logging.getLogger("coordinator")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for flag, env, text in settings_help():
        parser.add_argument(flag, default=None, help=f"{text} [${env}]")


def _settings_from(args: argparse.Namespace) -> Settings:
    keys = {f.replace("-", "_").lstrip("_") for f, _, _ in settings_help()}
    return load_settings({k: v for k, v in vars(args).items() if k in keys})


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_server(args: argparse.Namespace) -> int:
    from coordinator.server import run_server

    settings = _settings_from(args)
    setup_logging(settings.log_level)
    return run_server(settings)


def cmd_postgres_url(args: argparse.Namespace) -> int:
    from coordinator.embedded import embedded_url

    settings = _settings_from(args)
    url = embedded_url(settings.data_path)
    if url is None:
        print(f"coordinator: no embedded PostgreSQL is running for data directory {settings.data_path} "
              "(start `coordinator server` without COORDINATOR_PG_CONNECTION_URL first)", file=sys.stderr)
        return 1
    print(url)
    return 0


def cmd_api_token(args: argparse.Namespace) -> int:
    import asyncio
    import secrets

    from coordinator.db import Database, DatabaseError
    from coordinator.embedded import embedded_url

    settings = _settings_from(args)
    if settings.api_token:
        print(settings.api_token)
        return 0
    url = settings.pg_url or embedded_url(settings.data_path)
    if not url:
        print("coordinator: no database: give --pg-url (or run from the data directory of a replica that uses "
              "the embedded PostgreSQL)", file=sys.stderr)
        return 2

    async def fetch() -> str:
        async with await Database.open(url, wait=settings.db_wait or 30.0) as db:
            return await db.get_or_create_site_config("api_token", lambda: secrets.token_urlsafe(32))

    try:
        print(asyncio.run(fetch()))
    except DatabaseError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coordinator.demo import run_demo

    setup_logging("warning")
    return run_demo(replicas=args.replicas, base_port=args.base_port, data_dir=args.data_dir, once=args.once)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        from coordinator.probe import main as probe_main

        return probe_main(argv[1:])
    parser = argparse.ArgumentParser(prog="coordinator", description="High-availability replica with an embedded DERP relay")
    parser.add_argument("--version", action="version", version=f"coordinator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server", help="run one replica: HTTP API, DERP relay at /derp, control plane")
    _add_settings_flags(server)
    server.set_defaults(func=cmd_server)
    pg = sub.add_parser("postgres-url", help="print the URL of the embedded PostgreSQL of a data directory")
    pg.add_argument("--data-dir", default=None, help="data directory [$COORDINATOR_DATA_DIR]")
    pg.set_defaults(func=cmd_postgres_url)
    token = sub.add_parser("api-token", help="print the operator API's bearer token (created once, stored in Postgres)")
    for flag in ("--pg-url", "--data-dir", "--api-token", "--db-wait"):
        token.add_argument(flag, default=None)
    token.set_defaults(func=cmd_api_token)
    # `coordinator probe ...` is handed to coordinator.probe whole (see main below); listed here for --help.
    sub.add_parser("probe", help="measure latency to the database, pub/sub and every replica (probe --help)",
                   add_help=False)
    demo = sub.add_parser("demo", help="start 3 local replicas (+ nginx if installed) and show packets crossing them")
    demo.add_argument("--replicas", type=int, default=3)
    demo.add_argument("--base-port", type=int, default=0, help="first port (default: free ports)")
    demo.add_argument("--data-dir", default=None, help="keep data here (default: a temporary directory)")
    demo.add_argument("--once", action="store_true", help="exit after showing the packets")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"coordinator: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

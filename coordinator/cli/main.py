"""``coordinator`` command line: ``server`` runs one replica."""

from __future__ import annotations

import argparse
import logging
import sys

from coordinator.core import logformat
from coordinator.core.errors import ConfigError
from coordinator.core.keys import InvalidKey
from coordinator.core.settings import Settings, declared_settings, default_text, load_settings
from coordinator.core.version import __version__

log = logging.getLogger("coordinator")

# The settings `coordinator api-token` and `postgres-url` take (the server takes all of them).
TOKEN_SETTINGS = ("pg_url", "db_wait", "data_dir", "api_token", "api_token_file")
# The settings `coordinator derpmap` takes: what the DERP map is made of.
DERPMAP_SETTINGS = ("access_url", "region_id", "region_code", "region_name", "derp_server_enable", "derp_config_url",
                    "derp_config_path")


def _add_settings_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    for f in declared_settings():
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        envs = " or ".join("$" + v for v in (meta["env"], *meta["aliases"]))
        text = f"{meta['help']} (default: {default_text(f)}) [{envs}]".replace("%", "%%")
        parser.add_argument(meta["flag"], dest=f.name, default=None, help=text,
                            metavar=meta["flag"][2:].upper().replace("-", "_"))


def _settings_from(args: argparse.Namespace) -> Settings:
    """The declared settings from the flags given and the environment; warnings go to stderr, one line each."""
    settings = load_settings({f.name: getattr(args, f.name, None) for f in declared_settings()})
    for note in settings.warnings:
        print(f"coordinator: warning: {note}", file=sys.stderr, flush=True)
    return settings


def setup_logging(level: str, kind: str = "human", json_file: str = "", json_file_source: str = "--log-json") -> None:
    """Log lines to stderr in ``kind`` (human or json), and JSON to ``json_file`` too (see core.logformat)."""
    try:
        logformat.configure(level, kind, json_file)
    except OSError as exc:
        raise ConfigError(f"{json_file_source}: cannot open {json_file} for logs: {exc.strerror or exc}") from None
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO


def cmd_server(args: argparse.Namespace) -> int:
    from coordinator.cli.server import run_server
    from coordinator.relay.derpconfig import DerpMaps

    settings = _settings_from(args)
    derp_maps = DerpMaps.load(settings)  # before anything starts: a bad custom DERP map is refused (exit 2)
    setup_logging(settings.log_level, settings.log_format, settings.log_json, settings.source("log_json"))
    return run_server(settings, derp_maps)


def cmd_postgres_url(args: argparse.Namespace) -> int:
    from coordinator.cluster.embedded import embedded_url

    settings = _settings_from(args)
    url = embedded_url(settings.data_path)
    if url is None:
        print(f"coordinator: no embedded PostgreSQL is running for data directory {settings.data_path} "
              "(start `coordinator server` without COORDINATOR_PG_CONNECTION_URL first)", file=sys.stderr)
        return 1
    print(url)
    return 0


def _print_stored_secret(args: argparse.Namespace, field: str, site_key: str) -> int:
    """Print the secret set as ``field`` (flag, file or environment), else the one stored in Postgres
    under ``site_key`` (created once by whichever replica or command asks first)."""
    import asyncio
    import secrets

    from coordinator.cluster.db import Database
    from coordinator.cluster.dberrors import DatabaseError
    from coordinator.cluster.embedded import embedded_url

    settings = _settings_from(args)
    if getattr(settings, field):
        print(getattr(settings, field))
        return 0
    url = settings.pg_url or embedded_url(settings.data_path)
    if not url:
        print("coordinator: no database: give --pg-url or $COORDINATOR_PG_CONNECTION_URL (or the --data-dir of a "
              "replica that uses the embedded PostgreSQL)", file=sys.stderr)
        return 2

    async def fetch() -> str:
        async with await Database.open(url, wait=settings.db_wait or 30.0) as db:
            return await db.get_or_create_site_config(site_key, lambda: secrets.token_urlsafe(32))

    try:
        print(asyncio.run(fetch()))
    except DatabaseError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_api_token(args: argparse.Namespace) -> int:
    from coordinator.cluster.controlplane import API_TOKEN_KEY

    return _print_stored_secret(args, "api_token", API_TOKEN_KEY)


# The settings `coordinator tailnet-token` takes.
TAILNET_TOKEN_SETTINGS = ("pg_url", "db_wait", "data_dir", "tailnet_token", "tailnet_token_file")


def cmd_tailnet_token(args: argparse.Namespace) -> int:
    """Print the peer coordinator's bearer token (docs/coordinator.md): the one set, else the stored one."""
    from coordinator.cluster.tailnet.auth import TOKEN_KEY

    return _print_stored_secret(args, "tailnet_token", TOKEN_KEY)


def cmd_derpmap(args: argparse.Namespace) -> int:
    from coordinator.relay.derpconfig import DerpMaps

    maps = DerpMaps.load(_settings_from(args))
    if not maps.published.body:
        raise ConfigError(maps.published.missing)
    print(maps.published.body.decode())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coordinator.cli.demo import run_demo

    setup_logging("warning")
    return run_demo(replicas=args.replicas, base_port=args.base_port, data_dir=args.data_dir, once=args.once)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        from coordinator.ops.probe import main as probe_main

        return probe_main(argv[1:])
    parser = argparse.ArgumentParser(prog="coordinator", description="High-availability replica with an embedded DERP relay",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"coordinator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server", help="run one replica: HTTP API, DERP relay at /derp, control plane",
                            allow_abbrev=False)
    _add_settings_flags(server)
    server.set_defaults(func=cmd_server)
    pg = sub.add_parser("postgres-url", help="print the URL of the embedded PostgreSQL of a data directory",
                        allow_abbrev=False)
    _add_settings_flags(pg, ("data_dir",))
    pg.set_defaults(func=cmd_postgres_url)
    token = sub.add_parser("api-token", help="print the operator API's bearer token (created once, stored in Postgres)",
                           allow_abbrev=False)
    _add_settings_flags(token, TOKEN_SETTINGS)
    token.set_defaults(func=cmd_api_token)
    tailnet_token = sub.add_parser(
        "tailnet-token", help="print the peer coordinator's bearer token (created once, stored in Postgres)",
        allow_abbrev=False)
    _add_settings_flags(tailnet_token, TAILNET_TOKEN_SETTINGS)
    tailnet_token.set_defaults(func=cmd_tailnet_token)
    derpmap = sub.add_parser("derpmap", help="print the DERP map (tailcfg.DERPMap JSON) that /derpmap/default serves")
    _add_settings_flags(derpmap, DERPMAP_SETTINGS)
    derpmap.set_defaults(func=cmd_derpmap)
    # `coordinator probe ...` is handed to coordinator.ops.probe whole (see main below); listed here for --help.
    sub.add_parser("probe", help="measure latency to the database, pub/sub and every replica (probe --help)",
                   add_help=False)
    demo = sub.add_parser("demo", help="start 3 local replicas (+ nginx if installed) and show packets crossing them",
                          allow_abbrev=False)
    demo.add_argument("--replicas", type=int, default=3)
    demo.add_argument("--base-port", type=int, default=0, help="first port (default: free ports)")
    demo.add_argument("--data-dir", default=None, help="keep data here (default: a temporary directory)")
    demo.add_argument("--once", action="store_true", help="exit after showing the packets")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, InvalidKey) as exc:
        print(f"coordinator: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

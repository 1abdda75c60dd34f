"""Run nginx in front of local replicas with the example config from ``deploy/nginx/``.

Used by ``coordinator demo`` and the tests, so the example that users copy is the one that runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent
# In an installed wheel the example sits inside the package (setup.py puts it there); in a source
# checkout (and an editable install) it is deploy/nginx/ of the repository.
EXAMPLE = next((p for p in (_PACKAGE / "deploy" / "nginx" / "coordinator.conf",
                            _PACKAGE.parent / "deploy" / "nginx" / "coordinator.conf") if p.is_file()),
               _PACKAGE.parent / "deploy" / "nginx" / "coordinator.conf")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_upstreams(example: str, upstreams: list[tuple[str, int]]) -> str:
    """The example with its upstream servers replaced (the only edit an operator must make)."""
    servers = "".join(f"    server {h}:{p} max_fails=1 fail_timeout=5s;\n" for h, p in upstreams)
    out, n = re.subn(r"(upstream coordinator_replicas \{\n)(?:    server [^\n]*\n)+", lambda m: m.group(1) + servers, example)
    if n != 1:
        raise ValueError("upstream block not found in the nginx example")
    return out


def render_site(example: str, upstreams: list[tuple[str, int]], listen: tuple[str, int]) -> str:
    """The example site with its upstream servers and listen address replaced."""
    out, n = re.subn(r"listen 80;", f"listen {listen[0]}:{listen[1]};", render_upstreams(example, upstreams))
    if n != 1:
        raise ValueError("listen line not found in the nginx example")
    return out


def write_config(prefix: Path, upstreams: list[tuple[str, int]], listen: tuple[str, int], example: Path = EXAMPLE) -> Path:
    """A complete nginx.conf under ``prefix`` (foreground, logs and temp files inside it)."""
    site = render_site(example.read_text(), upstreams, listen)
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        "daemon off;\nworker_processes 1;\npid nginx.pid;\nerror_log logs/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n access_log off;\n client_body_temp_path tmp; proxy_temp_path tmp;\n"
        " fastcgi_temp_path tmp; uwsgi_temp_path tmp; scgi_temp_path tmp;\n" + site + "}\n"
    )
    return conf


def command(prefix: Path, conf: Path) -> list[str]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    return [binary, "-p", str(prefix), "-c", str(conf)]


def check(prefix: Path, conf: Path) -> None:
    """Raise with nginx's own message if the config does not parse."""
    out = subprocess.run([*command(prefix, conf), "-t"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip())

"""deploy/nginx/coordinator.conf as shipped, in a stock Debian nginx with its default site still enabled.

The layout is a copy of the distribution's /etc/nginx with the example added to conf.d/ unchanged
except for its upstream servers (the copy's own nginx.conf only has its absolute paths pointed at
the copy). Both it and Debian's default site listen on port 80, so the scenario runs in private
network and mount namespaces (``unshare``): port 80 is then free whatever the machine runs, and
the access host resolves through a hosts file bind-mounted inside that namespace only. Nothing is
written under /etc. Run as ``python tests/test_nginx_stock.py WORKDIR`` inside the namespaces.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from coordinator.cli import nginx
from testkit.polling import wait_for
from testkit.procs import ROOT, python

ETC_NGINX = Path("/etc/nginx")
ACCESS_HOST = "coder.big.corp"  # the example's server_name


def stock_layout(dest: Path, upstreams: list[tuple[str, int]]) -> Path:
    """A copy of /etc/nginx with conf.d/coordinator.conf added; returns its nginx.conf."""
    shutil.copytree(ETC_NGINX, dest, symlinks=False)
    (dest / "logs").mkdir()
    conf = dest / "nginx.conf"
    text = conf.read_text().replace(str(ETC_NGINX) + "/", str(dest) + "/")
    text = re.sub(r"^(\s*)pid [^;]+;", rf"\1pid {dest}/nginx.pid;", text, flags=re.M)
    text = text.replace("/var/log/nginx/", f"{dest}/logs/")
    conf.write_text(text)
    site = nginx.render_upstreams(nginx.EXAMPLE.read_text(), upstreams)
    (dest / "conf.d" / "coordinator.conf").write_text(site)
    return conf


def changed_lines(a: str, b: str) -> list[str]:
    return sorted(set(a.splitlines()) ^ set(b.splitlines()))


async def relay_through_nginx() -> list[str]:
    from coordinator.relay.client import DerpClient

    done = []
    for websocket in (False, True):
        url = f"http://{ACCESS_HOST}/derp"
        async with await DerpClient.connect(url, websocket=websocket) as a, \
                await DerpClient.connect(url, websocket=websocket) as b:

            async def crossed():  # the two may sit on different replicas: the mesh needs a moment to learn b
                await a.send(b.public_key, b"through stock nginx")
                return await b.recv_packet(timeout=0.2)

            packet = await wait_for(crossed, 15, "a packet through nginx", 0, ignore=(TimeoutError,))
            assert packet.data == b"through stock nginx"
            done.append("websocket" if websocket else "raw upgrade")
    return done


def scenario(work: Path) -> None:
    """Inside the namespaces: Postgres, two replicas, the stock layout on port 80, DERP through it."""
    from testkit.cluster import HACluster
    from testkit.pgcluster import PgCluster
    from testkit.procs import Proc

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts = work / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {ACCESS_HOST}\n::1 localhost\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)  # this mount namespace only
    pg = PgCluster()
    pg.start()
    cluster = HACluster(pg.url, heartbeat="500ms")
    proc = None
    try:
        replicas = [cluster.add_replica() for _ in range(2)]
        conf = stock_layout(work / "etc-nginx", [("127.0.0.1", r.port) for r in replicas])
        diff = changed_lines(nginx.EXAMPLE.read_text(), (work / "etc-nginx" / "conf.d" / "coordinator.conf").read_text())
        assert all(line.strip().startswith("server ") for line in diff), diff  # only the upstream servers changed
        test = subprocess.run([nginx.nginx_binary(), "-t", "-c", str(conf)], capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        proc = Proc([nginx.nginx_binary(), "-c", str(conf), "-g", "daemon off;"], log=work / "nginx.out")
        proc.wait_http(f"http://{ACCESS_HOST}/healthz")
        print("access host answered by the example: /healthz OK")
        try:
            urllib.request.urlopen("http://127.0.0.1/healthz", timeout=5)
            raise AssertionError("the default site should answer other host names")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        print("other host names still answered by Debian's default site (404)")
        for how in asyncio.run(relay_through_nginx()):
            print(f"DERP through stock nginx over {how}: packet delivered")
    finally:
        if proc is not None:
            proc.stop()
        cluster.close()
        pg.destroy()


@pytest.mark.timeout(300)
def test_example_works_dropped_into_stock_debian_conf_d(tmp_path):
    if nginx.nginx_binary() is None or not (ETC_NGINX / "sites-enabled").is_dir():
        pytest.skip("Debian's nginx package is not installed (scripts/bootstrap.sh installs it)")
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to run on port 80 in a private network namespace")
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network and mount namespaces here: {probe.stderr.strip()}")
    assert (ETC_NGINX / "sites-enabled" / "default").exists(), "the default site must be enabled for this test"
    # A PID namespace too: if the test is killed, --kill-child takes every process of the scenario with it.
    run = subprocess.Popen(["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", python(), __file__, str(tmp_path)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)},  # testkit, as pytest's pythonpath gives it
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    print(out)
    assert run.returncode == 0, out[-5000:]
    assert "DERP through stock nginx over raw upgrade: packet delivered" in out
    assert "DERP through stock nginx over websocket: packet delivered" in out
    assert "default site (404)" in out


if __name__ == "__main__":
    scenario(Path(sys.argv[1]))

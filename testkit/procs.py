"""Start real server processes on free ports for tests; always reaped, even when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from testkit.pgcluster import free_port
from testkit.polling import wait_blocking

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A child process in its own session, with its output captured to a file."""

    def __init__(self, args: list[str], *, env: dict | None = None, log: Path, cwd: Path = ROOT):
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(args, env=full_env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200

        wait_blocking(ready, timeout, lambda: f"{url} to answer 200:\n{self.output[-3000:]}", 0.05, ignore=(OSError,))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def python() -> str:
    return sys.executable


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    """(status, body) of a GET, with the operator's bearer token if given; HTTP errors are answers too."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def refused_at_start(args: list[str], named: str) -> str:
    """Run ``coordinator <args>``, expect exit 2 with one stderr line naming ``named``; return that line."""
    proc = subprocess.run([python(), "-m", "coordinator", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0] and not proc.stdout, proc.stderr
    return lines[0]


def http_status(url: str) -> int | None:
    """The status of ``GET url``, or None if nothing answers."""
    try:
        return http_get(url)[0]
    except OSError:
        return None


__all__ = ["Proc", "free_port", "http_get", "http_status", "python", "refused_at_start", "ROOT"]

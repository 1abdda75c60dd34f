"""Network namespaces for partition tests and the soak: the real kernel, nothing on the host's network.

``NetLab(n)`` makes a hub namespace holding a bridge (10.231.<k>.1) and ``n`` node namespaces, each
joined to the bridge by a veth pair and given its own address (10.231.<k>.10+i); every address
lives inside a namespace made here, so the host's interfaces, routes and firewall are never touched.
A replica runs in a node namespace (``lab.exec_args(i) + [...]``) and reaches Postgres through its
Unix socket (the filesystem is shared); the driver talks to the replicas from the hub, either as a
process (``exec_args(HUB)``), by entering the hub with :meth:`enter` (a whole process), or by
running one function in a thread that joined the hub (:meth:`call`).

``partition(i, j)`` drops every packet between two nodes with an nftables table in each of their
namespaces; ``heal`` deletes those tables. :meth:`close` kills whatever still runs in the
namespaces and deletes them; :func:`sweep` removes the namespaces of labs whose owner died.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

PREFIX = "coordlab"
HUB = -1  # the index of the hub namespace in exec_args / call
CLONE_NEWNET = 0x40000000
TABLE = "coordlab_partition"
T = TypeVar("T")


class Unavailable(Exception):
    """This machine cannot make network namespaces or firewall rules (the message says why)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _nft(namespace: str, script: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=script, capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"nft in {namespace}: {done.stderr.strip()}")


def check() -> None:
    """Raise :class:`Unavailable` with a plain reason if namespaces and nftables cannot be used here."""
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (CAP_NET_ADMIN)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise Unavailable(f"{tool} is not installed (apt-get install {package}; scripts/bootstrap.sh test)")
    name = f"{PREFIX}{os.getpid()}-check"
    try:
        _ip("netns", "add", name)
        _nft(name, f"add table inet {TABLE}\n")
    except (RuntimeError, OSError) as exc:
        raise Unavailable(f"cannot make a network namespace with a firewall table here: {exc}") from None
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def sweep() -> None:
    """Delete the namespaces of earlier labs whose owning process is gone (a run that was SIGKILLed)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _kill_all(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _kill_all(namespace: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        if pid == str(os.getpid()):
            continue  # a driver that entered the hub
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class NetLab:
    """A hub namespace with a bridge and ``n`` node namespaces on it; always :meth:`close` it."""

    def __init__(self, n: int, *, subnet: int | None = None):
        self.n = n
        self.tag = f"{PREFIX}{os.getpid()}-{id(self) % 10000}"
        self.subnet = subnet if subnet is not None else 100 + (os.getpid() + id(self)) % 150
        self.hub = f"{self.tag}-hub"
        self.nodes = [f"{self.tag}-n{i}" for i in range(n)]
        self.partitions: set[tuple[int, int]] = set()
        self._made: list[str] = []

    @property
    def hub_address(self) -> str:
        return f"10.231.{self.subnet}.1"

    def address(self, i: int) -> str:
        return f"10.231.{self.subnet}.{10 + i}"

    def namespace(self, i: int) -> str:
        return self.hub if i == HUB else self.nodes[i]

    def create(self) -> NetLab:
        try:
            self._add(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.nodes):
                self._add(ns)
                _ip("-n", self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def exec_args(self, i: int) -> list[str]:
        """The command prefix that runs a program inside namespace ``i`` (HUB for the hub)."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def partition(self, i: int, j: int) -> None:
        """Drop every packet between nodes ``i`` and ``j`` (both directions, in both namespaces)."""
        for me, other in ((i, j), (j, i)):
            _nft(self.nodes[me], (
                f"add table inet {TABLE}\n"
                f"add chain inet {TABLE} in {{ type filter hook input priority 0; }}\n"
                f"add chain inet {TABLE} out {{ type filter hook output priority 0; }}\n"
                f"add rule inet {TABLE} in ip saddr {self.address(other)} drop\n"
                f"add rule inet {TABLE} out ip daddr {self.address(other)} drop\n"
            ))
        self.partitions.add((min(i, j), max(i, j)))

    def heal(self, i: int | None = None, j: int | None = None) -> None:
        """Remove the partition between ``i`` and ``j`` (every partition when none are given)."""
        pairs = list(self.partitions) if i is None or j is None else [(min(i, j), max(i, j))]
        for a, b in pairs:
            for node in (a, b):
                subprocess.run(["ip", "netns", "exec", self.nodes[node], "nft", "delete", "table", "inet", TABLE],
                               capture_output=True, timeout=30)
            self.partitions.discard((a, b))

    def enter(self, i: int = HUB) -> None:
        """Move this (still single-threaded) process into namespace ``i``; its children follow."""
        _setns(self.namespace(i))

    def call(self, i: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a new thread that joined namespace ``i``: the sockets it opens live there."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                _setns(self.namespace(i))
                out["value"] = fn(*args)
            except BaseException as exc:  # re-raised in the caller
                out["error"] = exc

        thread = threading.Thread(target=run, name=f"netns {self.namespace(i)}")
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them (their veths and rules go with them). Idempotent."""
        for ns in reversed(self._made):
            _kill_all(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
        self.partitions.clear()

    def __enter__(self) -> NetLab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _setns(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)

"""Counting a server's instructions with callgrind: figures that other load on the machine does not move.

CPU seconds per packet on a shared machine vary with whatever else runs; the instructions a server
executes per packet do not. ``--callgrind DIR`` runs each server under ``valgrind --tool=callgrind``
with instrumentation off, turns it on once the clients are connected and ready, and off (with a dump)
once they have finished: the dump's total, divided by the packets delivered, is the server's
user-space instructions per packet (the kernel's share, the same syscalls for every server
here, is not counted). Valgrind runs a program ~50x slower, so packet rates under it mean nothing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def wrap(argv: list[str], workdir: str, name: str) -> list[str]:
    """``argv`` run under callgrind, collecting nothing until ``start``."""
    out = os.path.join(workdir, f"callgrind.{name.replace(' ', '_')}.%p")
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]


def _control(pid: int, *args: str) -> None:
    done = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=60)
    if done.returncode or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid}: {done.stdout.strip()} {done.stderr.strip()}")


def start(pid: int) -> None:
    """Zero the counts and start collecting."""
    _control(pid, "-z")
    _control(pid, "-i", "on")


def stop(pid: int, workdir: str) -> int:
    """Stop collecting and dump; the instructions counted since ``start``."""
    _control(pid, "-i", "off")
    before = set(glob.glob(os.path.join(workdir, f"callgrind.*.{pid}*")))
    _control(pid, "-d")
    dumps = sorted(set(glob.glob(os.path.join(workdir, f"callgrind.*.{pid}*"))) - before, key=os.path.getmtime)
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for pid {pid}")
    found = {}
    with open(dumps[-1]) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                found[line.split(":")[0]] = int(line.split()[1])
    if not found:
        raise RuntimeError(f"no totals in {dumps[-1]}")
    return found.get("totals", found.get("summary", 0))

"""The floor: ``floor_relay.c``, a zero-work relay in C, compiled here and run as relays A and B."""

from __future__ import annotations

import os
import shutil
import subprocess

from bench import proc


class FloorProcess(proc.ServerProcess):
    """A ``floor_relay`` process: it keeps no counters, speaks no HTTP and sends no ServerInfo."""

    floor = True

    def stats(self, timeout: float = 5.0, path: str = "") -> dict:
        return {}


def build_floor(workdir: str, log) -> str | None:
    """Compile ``floor_relay.c`` into ``workdir``; None (with a note) if there is no C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    src = os.path.join(proc.SCRIPTS, "floor_relay.c")
    out = os.path.join(workdir, "floor_relay")
    if cc is None:
        print("note: no C compiler, so no floor relay to compare with (--no-floor to silence)", file=log)
        return None
    done = subprocess.run([cc, "-O2", "-o", out, src], capture_output=True, text=True)
    if done.returncode:
        print(f"note: floor_relay.c did not compile, so no floor to compare with:\n{done.stderr}", file=log)
        return None
    return out


def start_one_floor(binary: str, argv: list[str] | None = None) -> proc.ServerProcess:
    """One floor relay without a mesh peer (bench_relay.py); ``argv`` runs it some other way (callgrind)."""
    return FloorProcess(argv or [binary], "floor", start_timeout=60).__enter__()


def start_floor(binary: str, wrap=None) -> list[proc.ServerProcess]:
    """Floor relays A and B, A dialing B as its mesh peer; ``wrap(argv, name)`` runs them some other way."""
    wrap = wrap or (lambda argv, name: argv)
    b = FloorProcess(wrap([binary], "floor B"), "floor B", start_timeout=60).__enter__()
    try:
        a = FloorProcess(wrap([binary, str(b.port)], "floor A"), "floor A", start_timeout=60).__enter__()
    except BaseException:
        b.stop()
        raise
    return [a, b]

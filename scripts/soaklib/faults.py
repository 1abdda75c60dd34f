"""The soak's faults, drawn at random (seeded) from a deck, each followed until the fleet is whole again.

A fault's recovery time runs from the moment it ends (the replica was restarted or resumed, the
partition healed, the standby promoted, Postgres restarted) until every replica answers, reaches
Postgres and its pub/sub, and has a connected mesh link to every other. A replica still not whole
``REJOIN_TIMEOUT`` s later failed to rejoin.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field

from soaklib.fleet import Fleet, ReplicaSlot
from soaklib.kit import netlab

REJOIN_TIMEOUT = 90.0
STOP_SECONDS = 10.0  # SIGSTOP, then SIGCONT
PARTITION_SECONDS = 20.0
KINDS = ("replica-sigkill", "replica-sigterm", "replica-sigstop", "pg-failover", "pg-restart", "partition")
BOUNCER = "pgbouncer-restart"  # drawn only with --pgbouncer
DATABASE_FAULTS = ("pg-failover", "pg-restart", BOUNCER)


@dataclass
class Fault:
    kind: str
    target: str
    start: float  # monotonic
    ended: float = 0.0  # when the fault itself was over (restart issued, SIGCONT, healed, promoted)
    recovered: float | None = None
    replicas: list[int] = field(default_factory=list)  # replicas it touched (both sides of a partition)
    failed_to_rejoin: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else self.recovered - self.ended

    def as_dict(self, t0: float) -> dict:
        return {
            "kind": self.kind, "target": self.target, "at_s": round(self.start - t0, 1),
            "fault_s": round(self.ended - self.start, 2),
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
            "replicas": self.replicas, "failed_to_rejoin": self.failed_to_rejoin, "notes": self.notes,
        }


class Chaos:
    """Draws and runs faults on ``fleet``; ``kinds`` limits the deck (partition needs the lab)."""

    def __init__(self, fleet: Fleet, rng: random.Random, kinds: tuple[str, ...], log):
        self.fleet = fleet
        self.rng = rng
        self.kinds = kinds
        self.log = log
        self.faults: list[Fault] = []
        self._deck: list[str] = []

    def draw(self) -> str:
        if not self._deck:
            self._deck = list(self.kinds)
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    async def run_one(self, kind: str) -> Fault:
        replicas = self.fleet.replicas
        if kind.startswith("replica-"):
            r = self.rng.choice(replicas)
            fault = Fault(kind, f"replica {r.index}", time.monotonic(), replicas=[r.index])
            await {"replica-sigkill": self._kill, "replica-sigterm": self._term, "replica-sigstop": self._stop}[kind](r, fault)
        elif kind == "partition":
            a, b = sorted(self.rng.sample(range(len(replicas)), 2))
            fault = Fault(kind, f"replicas {a} and {b}", time.monotonic(), replicas=[a, b])
            await self._partition(a, b, fault)
        elif kind == "pg-failover":
            fault = Fault(kind, f"primary slot {self.fleet.pg.primary}", time.monotonic())
            await asyncio.to_thread(self.fleet.pg.kill_primary_and_promote)
            await asyncio.to_thread(self.fleet.point_bouncer)
            fault.ended = time.monotonic()
        elif kind == BOUNCER and self.fleet.bouncer is not None:
            fault = Fault(kind, "pgbouncer", time.monotonic())
            await asyncio.to_thread(self.fleet.bouncer.restart)
            fault.ended = time.monotonic()
        else:
            fault = Fault(kind, f"primary slot {self.fleet.pg.primary}", time.monotonic())
            await asyncio.to_thread(self.fleet.pg.restart_primary)
            fault.ended = time.monotonic()
        self.faults.append(fault)
        await self._await_recovery(fault)
        if kind == "pg-failover":
            started = time.monotonic()
            await asyncio.to_thread(self.fleet.pg.rebuild_standby)
            fault.notes.append(f"fresh standby streaming after {time.monotonic() - started:.1f} s")
        self.log(self._line(fault))
        return fault

    async def _kill(self, r: ReplicaSlot, fault: Fault) -> None:
        r.signal(signal.SIGKILL)
        await asyncio.to_thread(r.proc.wait if r.proc else (lambda: 0))
        r.start()
        fault.ended = time.monotonic()

    async def _term(self, r: ReplicaSlot, fault: Fault) -> None:
        r.signal(signal.SIGTERM)
        try:
            if r.proc is not None:
                await asyncio.to_thread(r.proc.wait, 30)  # subprocess's own timeout: TimeoutExpired after 30 s
            fault.notes.append(f"stopped in {time.monotonic() - fault.start:.2f} s")
        except Exception:
            fault.notes.append("did not stop within 30 s of SIGTERM; killed")
            r.signal(signal.SIGKILL)
        r.start()
        fault.ended = time.monotonic()

    async def _stop(self, r: ReplicaSlot, fault: Fault) -> None:
        r.signal(signal.SIGSTOP)
        r.stopped = True
        await asyncio.sleep(STOP_SECONDS)
        r.signal(signal.SIGCONT)
        r.stopped = False
        fault.ended = time.monotonic()

    async def _partition(self, a: int, b: int, fault: Fault) -> None:
        lab = self.fleet.lab
        assert lab is not None
        await asyncio.to_thread(lab.partition, a, b)
        seen = await self._reported(a, b, PARTITION_SECONDS)
        fault.notes.append(f"reported by both sides after {seen:.1f} s" if seen is not None
                           else "NOT reported by both sides during the partition")
        await asyncio.sleep(max(0.0, fault.start + PARTITION_SECONDS - time.monotonic()))
        await asyncio.to_thread(lab.heal, a, b)
        fault.ended = time.monotonic()

    async def _reported(self, a: int, b: int, within: float) -> float | None:
        """Seconds until both replicas' status shows the link to the other down, or None."""
        ra, rb = self.fleet.replicas[a], self.fleet.replicas[b]
        start = time.monotonic()
        while time.monotonic() - start < within:
            sa, sb = await asyncio.gather(asyncio.to_thread(ra.status), asyncio.to_thread(rb.status))
            if sa and sb and not sa["mesh"].get(rb.derp, {}).get("connected", True) \
                    and not sb["mesh"].get(ra.derp, {}).get("connected", True):
                return time.monotonic() - start
            await asyncio.sleep(0.25)
        return None

    async def _await_recovery(self, fault: Fault) -> None:
        """Until the fleet is whole; after a Postgres fault, also until every replica's heartbeat
        has reached the (new) primary, so a replica that has not yet noticed is not counted as well."""
        deadline = fault.ended + REJOIN_TIMEOUT
        pg, mark = self.fleet.pg, None
        while time.monotonic() < deadline:
            if fault.kind in DATABASE_FAULTS and mark is None:
                mark = await asyncio.to_thread(pg.now)
                if mark is None:
                    await asyncio.sleep(0.25)
                    continue
            beaten = mark is None or await asyncio.to_thread(pg.beats_since, mark) >= len(self.fleet.replicas)
            if beaten and await asyncio.to_thread(self.fleet.all_healthy):
                fault.recovered = time.monotonic()
                return
            await asyncio.sleep(0.25)
        bad = [r.index for r in self.fleet.replicas if not await asyncio.to_thread(self.fleet.healthy, r)]
        fault.failed_to_rejoin = bad
        fault.notes.append(f"replicas {bad} not whole {REJOIN_TIMEOUT:.0f} s after the fault")

    def _line(self, f: Fault) -> str:
        rec = f"recovered in {f.recovery_s:.2f} s" if f.recovery_s is not None else "DID NOT RECOVER"
        notes = f" ({'; '.join(f.notes)})" if f.notes else ""
        return f"fault {f.kind} on {f.target}: {rec}{notes}"


def available_kinds(lab: netlab.NetLab | None, wanted: tuple[str, ...], log) -> tuple[str, ...]:
    if lab is None and "partition" in wanted:
        log("partition fault skipped: no network namespaces (see the line above)")
        return tuple(k for k in wanted if k != "partition")
    return wanted

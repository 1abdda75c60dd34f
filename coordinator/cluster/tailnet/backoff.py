"""Jittered, bounded exponential backoff for a client that redials (the tailnet client's reconnects).

Equal jitter: the n-th delay is drawn from ``[d/2, d]`` with ``d = min(maximum, initial * 2**n)``,
so a fleet of peers closed at once by a dying replica spreads its redials out instead of storming
the survivors (Coder #12923), yet no peer waits longer than ``maximum``. A "try again later"
(:meth:`later`) spreads them over a wider window still.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial ({self.initial}) <= maximum ({self.maximum})")

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the ceiling up to ``maximum``."""
        ceiling = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 32))
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def later(self, floor: float = 1.0) -> float:
        """After "try again later" (close 1013): full jitter over a window of at least ``floor`` s.

        A coordinator that turns unhealthy or runs out of peer slots sends all its peers away at
        once; spread over the window, they come back (elsewhere, through the load balancer) at a
        rate the survivors can take instead of all within the first ``initial`` seconds.
        """
        ceiling = min(self.maximum, max(floor, self.initial * 2.0 ** min(self.attempts, 32)))
        self.attempts += 1
        return self._rng.uniform(0, ceiling)

    def soon(self) -> float:
        """A short delay for a redial that is expected to succeed (the replica said it is going away)."""
        return self._rng.uniform(0, self.initial)

    def reset(self) -> None:
        self.attempts = 0

"""Exponential back-off with full jitter (AWS architecture blog, "Exponential Backoff and Jitter").

Full jitter spreads a whole office's terminals over the interval when the uplink comes back, so
they do not reconnect in lock-step and knock the broker over again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    base_s: float = 0.5
    cap_s: float = 60.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [0, min(cap, base * 2**attempt)]."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.rng.uniform(self.base_s / 4, max(self.base_s / 4, ceiling))

    def reset(self) -> None:
        """Call after a successful connection."""
        self.attempt = 0

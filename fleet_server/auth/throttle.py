"""Failed logins per source address: a few are free, then the address waits, longer each time.

Policy (pure logic, no I/O; the clock is injected):

- Up to `free_failures` failed logins per address within `window_s` answer 401 as usual.
- Each failure past that blocks the address for `base_block_s`, doubling per further failure, at
  most `max_block_s`. While blocked, its requests are answered 429 with Retry-After *without the
  token being checked*, so guessing is slowed to a handful of tries per window whatever the rate.
- A legitimate client behind the same address (a NAT, an office proxy) is never locked out for
  ever: a block lasts at most `max_block_s`, failures are forgotten `window_s` after they happened,
  and a token that authenticated from this address within `known_good_s` passes through a block
  (it is still checked against the users table, so a revoked one is refused).
- Memory is bounded: at most `max_addresses` addresses are tracked, the least recently seen go.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

FREE_FAILURES = 10
WINDOW_S = 600.0
BASE_BLOCK_S = 1.0
MAX_BLOCK_S = 60.0
KNOWN_GOOD_S = 86_400.0
MAX_ADDRESSES = 10_000
MAX_KNOWN_GOOD_PER_ADDRESS = 32


@dataclass
class _Source:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    good: dict[str, float] = field(default_factory=dict)  # token hash -> last success


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed login as the throttle counted it."""

    recent: int  # failures from this address within the window, this one included
    blocked_for_s: float  # 0 while still among the free ones


class LoginThrottle:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        free_failures: int = FREE_FAILURES,
        window_s: float = WINDOW_S,
        base_block_s: float = BASE_BLOCK_S,
        max_block_s: float = MAX_BLOCK_S,
        known_good_s: float = KNOWN_GOOD_S,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.clock = clock
        self.free_failures = free_failures
        self.window_s = window_s
        self.base_block_s = base_block_s
        self.max_block_s = max_block_s
        self.known_good_s = known_good_s
        self.max_addresses = max_addresses
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._lock = threading.Lock()

    def _source(self, address: str, now: float) -> _Source:
        src = self._sources.get(address)
        if src is None:
            src = self._sources[address] = _Source()
            while len(self._sources) > self.max_addresses:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(address)
        while src.failures and src.failures[0] <= now - self.window_s:
            src.failures.popleft()
        return src

    def wait_s(self, address: str, token_hash: str) -> float:
        """Seconds `address` must wait before this token may be checked (0: check it now)."""
        with self._lock:
            now = self.clock()
            src = self._source(address, now)
            if src.blocked_until <= now:
                return 0.0
            seen = src.good.get(token_hash)
            if seen is not None and seen > now - self.known_good_s:
                return 0.0
            return src.blocked_until - now

    def failed(self, address: str) -> Failure:
        """Count a failed login from `address`; past the free ones, block it for a while."""
        with self._lock:
            now = self.clock()
            src = self._source(address, now)
            src.failures.append(now)
            over = len(src.failures) - self.free_failures
            if over <= 0:
                return Failure(len(src.failures), 0.0)
            block = min(self.base_block_s * 2.0 ** min(over - 1, 30), self.max_block_s)
            src.blocked_until = now + block
            return Failure(len(src.failures), block)

    def succeeded(self, address: str, token_hash: str) -> None:
        """Remember that this token works from `address`, so a block there does not stop it."""
        with self._lock:
            now = self.clock()
            src = self._source(address, now)
            src.good[token_hash] = now
            if len(src.good) > MAX_KNOWN_GOOD_PER_ADDRESS:
                del src.good[min(src.good, key=src.good.__getitem__)]

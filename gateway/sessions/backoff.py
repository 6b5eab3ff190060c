"""How long a session waits after a failed refresh, and what this process knows of it.

After a transient failure of the IdP, no replica asks it again for that session before an
interval has passed: ``refresh.backoff_first_s`` doubling with each consecutive failure up
to ``refresh.backoff_max_s``, jittered. The interval is kept in the store beside the
session (``SessionStore.save_backoff``), so every replica honours it; ``Backoffs`` remembers
what this process has learnt, so that requests meanwhile cost no store call. When to refresh
is ``sessions.refresh``'s decision.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections.abc import Callable

from gateway.metrics import Metrics
from gateway.sessions.model import RefreshBackoff
from gateway.settings import RefreshSettings


def interval_s(attempts: int, first_s: float, max_s: float, jitter: float) -> float:
    """The wait after the ``attempts``-th consecutive failure: ``first_s`` doubled per
    failure after the first, at most ``max_s``, times ``jitter`` in [0.5, 1]. Jitter only
    shortens, to no less than half, so replicas that failed together do not retry together
    and no wait exceeds the schedule."""
    nominal_s = first_s * 2.0 ** min(attempts - 1, 64)  # 2**64 s: past any max_s
    return min(nominal_s, max_s) * jitter


def retry_after_s(remaining_s: float) -> int:
    """``Retry-After`` for a wait of ``remaining_s``: whole seconds, never 0."""
    return max(1, math.ceil(remaining_s))


class Backoffs:
    """Sessions this process knows to be in backoff (its own failures, and those it read
    from the store), by storage id; ``tokengate_refresh_backoff_sessions`` counts them."""

    def __init__(
        self, settings: RefreshSettings, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self._first_s = settings.backoff_first_s
        self._max_s = settings.backoff_max_s
        self._gauge = metrics.refresh_backoff_sessions
        self._clock = clock
        self._until: dict[str, float] = {}
        # (until, storage id), earliest first: one timer forgets each backoff as it ends, so
        # the gauge falls without a request to notice.
        self._ends: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None

    def after_failure(self, previous: RefreshBackoff | None) -> RefreshBackoff:
        """The backoff after one more failure than ``previous`` counted."""
        attempts = (previous.attempts if previous is not None else 0) + 1
        # Not a secret, only a spread: random is the right tool.
        jitter = random.uniform(0.5, 1.0)  # noqa: S311
        return RefreshBackoff(
            attempts, self._clock() + interval_s(attempts, self._first_s, self._max_s, jitter)
        )

    def keep_s(self, backoff: RefreshBackoff) -> float:
        """How long the store keeps ``backoff``: past its end by the longest interval, so a
        failure after it still counts as consecutive."""
        return backoff.until - self._clock() + self._max_s

    def remaining_s(self, storage_id: str) -> float:
        """How long the session's backoff still runs, as far as this process knows; 0 if none."""
        until = self._until.get(storage_id)
        return 0.0 if until is None else max(0.0, until - self._clock())

    def remember(self, storage_id: str, until: float) -> None:
        if until <= self._clock():
            return
        self._until[storage_id] = until
        heapq.heappush(self._ends, (until, storage_id))
        self._gauge.set(len(self._until))
        if self._ends[0] == (until, storage_id):
            self._schedule()

    def forget(self, storage_id: str) -> None:
        if self._until.pop(storage_id, None) is not None:
            self._gauge.set(len(self._until))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self.close()
        if self._ends:
            delay_s = max(0.0, self._ends[0][0] - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock()
        while self._ends and self._ends[0][0] <= now:
            until, storage_id = heapq.heappop(self._ends)
            if self._until.get(storage_id) == until:
                del self._until[storage_id]
        self._gauge.set(len(self._until))
        self._schedule()

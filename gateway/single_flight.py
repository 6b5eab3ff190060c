"""Single flight: concurrent callers for one key share one task, owned here, not by them.

A refresh of a session, a load of a session not in the local cache, a fetch of the JWKS:
each is work many requests may want at once, which must run once and must not die with
whichever request asked first. ``SingleFlight`` keeps one task per key; ``join`` awaits it
through ``asyncio.shield``, so a caller that is cancelled (its client hung up) cancels only
its own wait. An exception reaches every waiter. Once a task is done, the next call starts
a fresh one; ``forget`` makes the next call start fresh even before that. What the work is
belongs to the caller.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Owns its tasks: ``aclose`` lets them finish within a grace and cancels the rest."""

    __slots__ = ("_forgotten", "_name", "_tasks")

    def __init__(self, name: str) -> None:
        self._name = name  # the tasks' name, for debugging
        self._tasks: dict[K, asyncio.Task[T]] = {}
        self._forgotten: set[asyncio.Task[T]] = set()  # still ours until done

    def __len__(self) -> int:
        return len(self._tasks)

    def running(self, key: K) -> asyncio.Task[T] | None:
        return self._tasks.get(key)

    def start(
        self,
        key: K,
        work: Callable[[], Coroutine[Any, Any, T]],
        *,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        """The task under way for ``key``, or ``work()`` started as one (in ``context``)."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(work(), name=self._name, context=context)
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._land(key, done))
        return task

    async def join(
        self,
        key: K,
        work: Callable[[], Coroutine[Any, Any, T]],
        *,
        context: contextvars.Context | None = None,
    ) -> T:
        """The result of the task for ``key``, started if none runs."""
        # shield: this caller may be cancelled; the shared task must not be.
        return await asyncio.shield(self.start(key, work, context=context))

    def forget(self, key: K) -> None:
        """The next call for ``key`` starts a new task; the one under way runs on for its
        present waiters (e.g. it may have read what has changed since)."""
        task = self._tasks.pop(key, None)
        if task is not None and not task.done():
            self._forgotten.add(task)

    def forget_all(self) -> None:
        """``forget`` every key."""
        for key in list(self._tasks):
            self.forget(key)

    def _land(self, key: K, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        self._forgotten.discard(task)
        if not task.cancelled():
            task.exception()  # read by the waiters, if any: never "never retrieved"

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for the tasks under way, then cancel what is left."""
        tasks = [*self._tasks.values(), *self._forgotten]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._forgotten.clear()

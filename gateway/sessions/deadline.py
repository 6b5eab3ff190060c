"""One deadline for a request's use of the session store.

A request may make several store calls (its session's load, redis-py's retry of it, the
reload of a forced refresh): ``bounded`` gives them one deadline, kept in a context
variable, so a store that cannot answer costs the request its timeout once, not once per
command and attempt. The store applies it (``sessions.redis_store``). Work that serves
many requests and outlives each (a refresh flight) starts from ``detached()``, without any
request's deadline, and its calls are bounded one by one.
"""

from __future__ import annotations

import asyncio
import contextvars

# Event-loop time (``loop.time()``) by which every store call of this context must end.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "session_store_deadline", default=None
)


class bounded:  # named as the function it replaced: ``with bounded(2.0):``
    """Every store call in this context, and in tasks started from it, ends within
    ``timeout_s`` from now, or earlier when an enclosing ``bounded`` says so. A class, not
    a ``@contextmanager`` generator: it is entered on every session request, and costs a
    third as much so."""

    __slots__ = ("_timeout_s", "_token")

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._token: contextvars.Token[float | None] | None = None

    def __enter__(self) -> None:
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        enclosing = _DEADLINE.get()
        if enclosing is None or enclosing > deadline:
            self._token = _DEADLINE.set(deadline)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _DEADLINE.reset(self._token)
            self._token = None


def deadline_of_call(timeout_s: float) -> float:
    """When a store call starting now must end: this context's deadline, or else
    ``timeout_s`` from now (the call alone, redis-py's retry included)."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return asyncio.get_running_loop().time() + timeout_s
    return deadline


def detached() -> contextvars.Context:
    """A copy of this context without a store deadline, for a task that outlives the
    request that starts it (``asyncio.create_task(..., context=detached())``)."""
    context = contextvars.copy_context()
    context.run(_DEADLINE.set, None)
    return context

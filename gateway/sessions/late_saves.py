"""Rotated tokens the store could not take at once: held here, written late, never dropped
without a word.

Once the IdP has answered a refresh, its tokens are the only valid ones: the old refresh
token is spent, and presenting it again makes an IdP with reuse detection revoke the whole
grant. When the compare-and-set write of the refreshed session fails because the store
cannot answer (a Sentinel or Cluster failover takes seconds), ``LateSaves`` keeps the session
in this process, hands it to the session's requests, and retries the write with jittered
backoff for as long as the refresh lock it inherits lives; then it releases the lock. A write
that could not be made by then is counted (``refresh_total{result="save_lost"}``) and logged
(``refresh_save_lost``). When to refresh, and the lock, are ``sessions.refresh``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from gateway.errors import SessionStoreUnavailableError
from gateway.metrics import Metrics
from gateway.sessions.deadline import detached
from gateway.sessions.model import Session, SessionHandle, SessionStore
from gateway.settings import RefreshSettings

log = logging.getLogger(__name__)

_FIRST_RETRY_S = 0.05
_MAX_RETRY_S = 1.0
# The last write must end this long before the lock's TTL runs out: from then on another
# replica may take the lock, reload the old session and present the spent refresh token.
_LOCK_MARGIN_S = 1.0


class LateSaves:
    """Refreshed sessions waiting for the store, by storage id; each owns its lock."""

    def __init__(self, store: SessionStore, settings: RefreshSettings, metrics: Metrics) -> None:
        self._store = store
        self._lock_ttl_s = settings.lock_ttl_s
        self._metrics = metrics
        self._held: dict[str, tuple[Session, str]] = {}  # the session, its lock's token
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = asyncio.Event()

    def newest(self, storage_id: str, session: Session) -> Session:
        """``session``, or the refreshed one held for it while ``session`` is no newer (it
        still carries the spent refresh token, and must never be refreshed with it)."""
        held = self._held.get(storage_id)
        if held is not None and session.version <= held[0].version:
            return held[0]
        return session

    def held(self, storage_id: str) -> Session | None:
        held = self._held.get(storage_id)
        return None if held is None else held[0]

    def owns_lock(self, storage_id: str, token: str) -> bool:
        """Whether the lock acquired with ``token`` was handed over here (so it is not the
        refresh's to release)."""
        held = self._held.get(storage_id)
        return held is not None and held[1] == token

    def hold(self, handle: SessionHandle, session: Session, token: str, locked_at: float) -> None:
        """Keep ``session`` (written by nobody yet) and write it late, under the lock taken
        with ``token`` at ``locked_at`` (event-loop time)."""
        storage_id = handle.storage_id
        superseded = self._tasks.pop(storage_id, None)
        if superseded is not None:
            # Refreshed again from the held session (its new refresh token): the newer write
            # replaces the older, and both are of the same stored version.
            superseded.cancel()
        self._held[storage_id] = (session, token)
        self._metrics.refresh_saves_pending.set(len(self._held))
        deadline = locked_at + self._lock_ttl_s - _LOCK_MARGIN_S
        task = asyncio.create_task(
            self._save_late(handle, session, token, deadline),
            name="session-late-save",
            context=detached(),  # no request's deadline: it outlives every request
        )
        self._tasks[storage_id] = task
        task.add_done_callback(lambda done: self._landed(storage_id, done))

    async def aclose(self) -> None:
        """One last attempt for each held session (its tokens are lost otherwise), then stop."""
        self._closing.set()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=_MAX_RETRY_S + _LOCK_MARGIN_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, storage_id: str, token: str) -> None:
        if self.owns_lock(storage_id, token):
            del self._held[storage_id]
            self._metrics.refresh_saves_pending.set(len(self._held))

    def _landed(self, storage_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(storage_id) is task:
            del self._tasks[storage_id]
            held = self._held.get(storage_id)
            if held is not None:
                self._drop(storage_id, held[1])  # cancelled at shutdown
        if not task.cancelled():
            task.exception()  # nothing awaits it; never "never retrieved"

    async def _save_late(
        self, handle: SessionHandle, session: Session, token: str, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        delay_s = _FIRST_RETRY_S
        attempts = 0
        while True:
            # Jittered, so replicas that lost the store together do not retry together; the
            # last attempt starts before the deadline, and ``aclose`` cuts a pause short.
            jitter = random.uniform(0.5, 1.0)  # noqa: S311  # a spread, not a secret
            pause_s = min(delay_s * jitter, deadline - loop.time() - _FIRST_RETRY_S)
            if pause_s > 0 and not self._closing.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause_s):
                        await self._closing.wait()
            delay_s = min(delay_s * 2, _MAX_RETRY_S)
            attempts += 1
            result = await self._try_save(handle, session, deadline)
            if result is not None:
                self._metrics.refresh_total.labels(result=result).inc()
                log.info("refresh", extra={"result": result, "attempts": attempts})
                break
            if self._closing.is_set() or loop.time() >= deadline - _FIRST_RETRY_S:
                self._metrics.refresh_total.labels(result="save_lost").inc()
                log.error("refresh_save_lost", extra={"attempts": attempts})
                break
        self._drop(handle.storage_id, token)  # stored, or lost: no longer ours to serve
        with contextlib.suppress(SessionStoreUnavailableError):
            await self._store.release_lock(handle, token)  # else its TTL frees it

    async def _try_save(
        self, handle: SessionHandle, session: Session, deadline: float
    ) -> str | None:
        """``saved_late``, ``conflict`` (the session ended or was rewritten meanwhile), or
        None: the store still cannot answer."""
        try:
            async with asyncio.timeout_at(deadline):
                if await self._store.save(handle, session) is not None:
                    return "saved_late"
                # Compare-and-set lost. An earlier attempt may have been written with its
                # reply lost on the way: then the stored tokens are ours.
                stored = await self._store.load(handle)
        except (SessionStoreUnavailableError, TimeoutError):
            return None
        if stored is not None and stored.access_token == session.access_token:
            return "saved_late"
        return "conflict"

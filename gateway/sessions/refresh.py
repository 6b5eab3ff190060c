"""Refresh under a lock: for one session, exactly one IdP refresh per expiry.

In this process a single flight per session (concurrent callers share one task); across
processes and replicas the store's per-session lock, after which the session is reloaded
(another replica may already have refreshed). The flight is a task owned here, not by any
request: a request whose token is still valid does not wait for it (refresh-ahead runs in
the background), the others await it through ``asyncio.shield``, so a client that hangs
up cancels only its own wait, and the IdP call and the compare-and-set write of its result
always finish. A forced refresh (an upstream rejected the token) takes the same flight and
lock, and is declined while the token is younger than ``forced_min_interval_s``. After a
failed refresh the IdP is left alone for a while (``sessions.backoff``); tokens the store
could not take are written late (``sessions.late_saves``). What the IdP is asked, and how,
is the dialect's job (``idp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import Tracer

from gateway.errors import (
    IdpError,
    RefreshUnavailableError,
    SessionExpiredError,
    SessionStoreUnavailableError,
)
from gateway.idp.tokens import IdpUnavailable, RefreshDialect, RefreshRejected
from gateway.metrics import Metrics
from gateway.sessions.backoff import Backoffs, retry_after_s
from gateway.sessions.deadline import detached
from gateway.sessions.late_saves import LateSaves
from gateway.sessions.model import RefreshBackoff, Session, SessionHandle, SessionStore
from gateway.settings import RefreshSettings
from gateway.single_flight import SingleFlight
from gateway.tracing import NO_TRACER

log = logging.getLogger(__name__)

# A token this close to its expiry is not forwarded while a refresh is under way: it could
# expire on its way to the upstream. The request waits for the refresh instead.
_VALID_MARGIN_S = 1.0


class Refresher:
    def __init__(
        self,
        store: SessionStore,
        dialect: RefreshDialect,
        settings: RefreshSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._store = store
        self._dialect = dialect
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._flights: SingleFlight[str, Session] = SingleFlight("session-refresh")
        self._backoffs = Backoffs(settings, metrics, clock)
        self._late = LateSaves(store, settings, metrics)

    def needs_refresh(self, session: Session) -> bool:
        return session.access_expires_at - self._settings.ahead_s <= self._clock()

    def _may_force(self, session: Session) -> bool:
        """Whether an upstream's rejection of ``session``'s token may refresh it now.

        SECURITY: not within ``forced_min_interval_s`` of the refresh that obtained it. An
        upstream that answers 401 to every token would otherwise make each request refresh
        the token the one before it just obtained: a grant at the IdP per request. The
        decision reads the session itself, so it holds on every replica."""
        return self._clock() - session.refreshed_at >= self._settings.forced_min_interval_s

    def fresh(self, handle: SessionHandle, session: Session) -> Session | None:
        """``ensure_fresh``'s answer when it needs no refresh (the newest copy of
        ``session``), without an await; None when a refresh is wanted."""
        session = self._late.newest(handle.storage_id, session)
        return None if self._wants_refresh(session, False) else session

    async def ensure_fresh(
        self, handle: SessionHandle, session: Session, *, force: bool = False
    ) -> Session:
        """The session with an access token good for ``ahead_s`` more; ``force`` refreshes
        even so (an upstream rejected ``session``'s token), unless the token was already
        replaced or is too young (``_may_force``).

        Inside the ahead window a token still valid for a moment is returned at once, and
        the refresh runs in the background; only an expired token, or a forced refresh
        (whose caller replays with the new token), waits for it."""
        session = self._late.newest(handle.storage_id, session)
        if not self._wants_refresh(session, force):
            if force:
                self._result("forced_too_soon")
            return session
        backoff_s = self._backoffs.remaining_s(handle.storage_id)
        if backoff_s > 0:
            # A refresh of this session failed lately: the IdP is left alone meanwhile. Not
            # counted: refresh_total counts refreshes (flights), not the requests they serve.
            return self._serve_stale(session, retry_after_s(backoff_s))
        # Detached: the flight serves every request of the session, so no request's store
        # deadline applies to it; each of its store calls is bounded by itself.
        flight = self._flights.start(
            handle.storage_id, lambda: self._refresh(handle, session, force), context=detached()
        )
        if not force and session.access_expires_at - _VALID_MARGIN_S > self._clock():
            # Refresh-ahead: the token still works, so this request does not wait for the
            # IdP or for a lock (one orphaned by a dead replica or a failover waits out its
            # TTL); the flight goes on, owned here, and the next request finds its result.
            return session
        started = time.perf_counter()
        try:
            with self._tracer.start_as_current_span("refresh wait"):
                # shield: this caller may be cancelled (client gone); the flight must not be.
                return await asyncio.shield(flight)
        finally:
            self._metrics.refresh_lock_wait_seconds.observe(time.perf_counter() - started)

    @property
    def refreshing(self) -> int:
        """How many sessions have a refresh under way in this process."""
        return len(self._flights)

    def held(self, storage_id: str) -> Session | None:
        """The refreshed session this process holds while the store cannot take it yet."""
        return self._late.held(storage_id)

    async def aclose(self) -> None:
        """Let flights in progress land (they carry rotated refresh tokens), make one last
        attempt at each late write, then stop."""
        await self._flights.aclose(grace_s=self._settings.timeout_s + 1)
        await self._late.aclose()
        self._backoffs.close()

    def _wants_refresh(self, session: Session, force: bool) -> bool:
        return self.needs_refresh(session) or (force and self._may_force(session))

    def _is_fresh(self, current: Session, seen: Session, force: bool) -> bool:
        if current.access_token != seen.access_token:
            return True  # someone refreshed since this request read the session
        return not self._wants_refresh(current, force)

    def _result(self, result: str) -> None:
        """Count a refresh's result, and say it on its span (``_refresh``'s, current)."""
        self._metrics.refresh_total.labels(result=result).inc()
        trace.get_current_span().set_attribute("tokengate.refresh.result", result)

    async def _refresh(self, handle: SessionHandle, seen: Session, force: bool) -> Session:
        # Under the span of the request that started the flight (its context is copied).
        attributes = {
            "tokengate.refresh.dialect": self._settings.dialect,
            "tokengate.refresh.forced": force,
        }
        with self._tracer.start_as_current_span("session refresh", attributes=attributes):
            return await self._refresh_locked(handle, seen, force)

    async def _refresh_locked(self, handle: SessionHandle, seen: Session, force: bool) -> Session:
        store = self._store
        deadline = time.monotonic() + self._settings.effective_lock_wait_s
        current = seen
        while True:
            # Before the lock: a session in backoff costs no lock traffic, and a replica that
            # waited for the lock learns here that its holder's refresh failed.
            backoff = await store.load_backoff(handle)
            if backoff is not None and backoff.until > self._clock():
                self._backoffs.remember(handle.storage_id, backoff.until)
                self._result("backoff")
                return self._serve_stale(current, retry_after_s(backoff.until - self._clock()))
            token = secrets.token_urlsafe(18)  # a fresh lock token per acquisition
            locked_at = asyncio.get_running_loop().time()  # no later than the lock's start
            if await store.acquire_lock(handle, token, self._settings.lock_ttl_s):
                try:
                    current = await self._reload(handle)
                    if self._is_fresh(current, seen, force):
                        self._result("already_fresh")
                        return current
                    return await self._call_idp(handle, current, backoff, token, locked_at)
                finally:
                    if not self._late.owns_lock(handle.storage_id, token):
                        await self._release(handle, token)
            remaining = deadline - time.monotonic()
            if remaining > 0:
                # Another replica (or a lock orphaned by one) holds the refresh.
                trace.get_current_span().set_attribute("tokengate.refresh.waited_for_lock", True)
                with self._tracer.start_as_current_span(
                    "refresh lock wait", attributes={"tokengate.lock.held_by": "another_replica"}
                ):
                    await store.wait_for_unlock(handle, remaining)
            current = await self._reload(handle)
            if self._is_fresh(current, seen, force):
                return current
            if time.monotonic() >= deadline:
                self._result("lock_timeout")
                return self._serve_stale(current)

    async def _release(self, handle: SessionHandle, token: str) -> None:
        with contextlib.suppress(SessionStoreUnavailableError):
            # Counted and logged by the store; the lock's TTL frees it. The refresh's
            # outcome stands: its callers must not lose the tokens it saved.
            await self._store.release_lock(handle, token)

    async def _reload(self, handle: SessionHandle) -> Session:
        current = await self._store.load(handle)
        if current is None:
            raise SessionExpiredError()  # ended, even with a late write pending: it loses
        # A replica whose lock a failover lost may reach here while this process still holds
        # the rotated tokens: the stored session's refresh token is spent; use ours.
        return self._late.newest(handle.storage_id, current)

    async def _call_idp(
        self,
        handle: SessionHandle,
        current: Session,
        backoff: RefreshBackoff | None,
        lock_token: str,
        locked_at: float,
    ) -> Session:
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                tokens = await self._dialect.refresh(current)
        except RefreshRejected:
            return await self._end_rejected(handle, current)
        except (IdpUnavailable, IdpError, TimeoutError) as exc:
            # Any failure to reach or understand the IdP (its discovery document included)
            # is transient for a session: serve the still-valid token, else 503.
            return await self._back_off(handle, current, backoff, exc)
        if backoff is not None:
            # Only when there was one: a refresh without a failure before costs no command.
            self._backoffs.forget(handle.storage_id)
            with contextlib.suppress(SessionStoreUnavailableError):
                await self._store.clear_backoff(handle)  # else it runs out by its TTL
        updated = current.with_tokens(
            access_token=tokens.access_token,
            access_expires_at=tokens.expires_at,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            scopes=tokens.scopes,
            refreshed_at=self._clock(),
        )
        try:
            saved = await self._store.save(handle, updated)
        except SessionStoreUnavailableError:
            # The IdP has rotated the tokens: from now on they are the only valid ones. Keep
            # them, and the lock, until the store takes them; serve them meanwhile.
            self._late.hold(handle, updated, lock_token, locked_at)
            return updated
        if saved is None:
            # Compare-and-set lost: the session was ended (logout) or rewritten meanwhile.
            self._result("conflict")
            return await self._reload(handle)
        self._result("success")
        log.info("refresh", extra={"result": "success", "version": saved.version})
        return saved

    async def _back_off(
        self,
        handle: SessionHandle,
        current: Session,
        previous: RefreshBackoff | None,
        exc: Exception,
    ) -> Session:
        """No refresh of this session, on any replica, until the backoff runs out."""
        backoff = self._backoffs.after_failure(previous)
        self._backoffs.remember(handle.storage_id, backoff.until)
        self._result("idp_unavailable")
        log.warning(
            "refresh",
            extra={
                "result": "idp_unavailable",
                "error_type": type(exc).__name__,
                "attempts": backoff.attempts,
                "backoff_s": round(backoff.until - self._clock(), 3),
            },
        )
        with contextlib.suppress(SessionStoreUnavailableError):
            # Counted and logged by the store; this process keeps the backoff even so.
            await self._store.save_backoff(handle, backoff, self._backoffs.keep_s(backoff))
        return self._serve_stale(current, retry_after_s(backoff.until - self._clock()))

    async def _end_rejected(self, handle: SessionHandle, current: Session) -> Session:
        # Before ending the session, reload: if its refresh token changed meanwhile (a writer
        # we did not see), the grant is alive under the new token.
        latest = await self._store.load(handle)
        if latest is not None and latest.refresh_token != current.refresh_token:
            return latest
        await self._store.delete(handle)
        self._result("invalid_grant")
        self._metrics.sessions_ended_total.labels(reason="refresh_rejected").inc()
        log.info("refresh", extra={"result": "invalid_grant"})
        raise SessionExpiredError()

    def _serve_stale(self, current: Session, retry_s: int | None = None) -> Session:
        """The IdP cannot help now: keep serving while the access token is still valid."""
        if current.access_expires_at > self._clock():
            return current
        raise RefreshUnavailableError(retry_s or self._settings.retry_after_s)

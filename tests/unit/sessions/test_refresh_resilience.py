"""Refresh that survives failover (unit level): the memory store, a scripted dialect.

A valid token never waits for a refresh or a lock. The same properties are shown against
a real redis-server and the real IdP in tests/integration/test_refresh_resilience.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import RefreshUnavailableError, SessionStoreUnavailableError
from gateway.idp.tokens import IdpUnavailable, TokenSet
from gateway.metrics import Metrics
from gateway.sessions.authenticator import SessionAuthenticator
from gateway.sessions.backoff import interval_s, retry_after_s
from gateway.sessions.cookie import SessionCookies, encode_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import Session, SessionHandle
from gateway.sessions.refresh import Refresher
from gateway.settings import CsrfSettings, RefreshSettings, SessionSettings
from tests.unit.sessions.test_authenticator import ROUTE
from tests.unit.sessions.test_refresh import Clock, ScriptedIdp, load


@dataclasses.dataclass
class Parts:
    store: MemorySessionStore
    idp: ScriptedIdp
    refresher: Refresher
    handle: SessionHandle
    metrics: Metrics

    async def expiring_in(self, seconds: float) -> Session:
        """The stored session, its access token now valid for ``seconds`` more."""
        current = await load(self.store, self.handle)
        saved = await self.store.save(
            self.handle, dataclasses.replace(current, access_expires_at=time.time() + seconds)
        )
        assert saved is not None
        return saved

    def counted(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tokengate_refresh_total", {"result": result}
        )
        return value or 0.0


async def build_parts(**settings: float) -> Parts:
    store = MemorySessionStore(SessionSettings(store="memory"))
    metrics = Metrics()
    idp = ScriptedIdp()
    refresh = RefreshSettings(**{"ahead_s": 60, "timeout_s": 1, **settings})
    handle = derive_handle(b"r" * 32)
    await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=time.time() + 30,  # inside ahead_s (60): a refresh is wanted
            refresh_token="refresh-0",
            created_at=time.time(),
        ),
    )
    return Parts(store, idp, Refresher(store, idp, refresh, metrics), handle, metrics)


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    built = await build_parts()
    yield built
    built.idp.release.set()
    await built.refresher.aclose()


async def loop_turns(count: int = 20) -> None:
    """Let every ready task run a step (a flight that could finish, would)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_valid_token_is_served_at_once_while_its_refresh_runs(parts: Parts) -> None:
    parts.idp.release.clear()  # the IdP holds every refresh until released
    valid = await load(parts.store, parts.handle)
    served = await parts.refresher.ensure_fresh(parts.handle, valid)
    assert served is valid
    await parts.idp.arrived.wait()  # the refresh did start, in the background
    # More requests with the valid token: served at once, joining the one refresh.
    for _ in range(5):
        assert await parts.refresher.ensure_fresh(parts.handle, valid) is valid
    assert parts.idp.calls == 1
    parts.idp.release.set()
    await parts.refresher.aclose()
    assert (await load(parts.store, parts.handle)).access_token == "access-1"


async def test_an_expired_token_waits_for_the_refresh(parts: Parts) -> None:
    parts.idp.release.clear()
    expired = await parts.expiring_in(-1)
    waiting = asyncio.ensure_future(parts.refresher.ensure_fresh(parts.handle, expired))
    await parts.idp.arrived.wait()
    await loop_turns()
    assert not waiting.done()
    parts.idp.release.set()
    assert (await waiting).access_token == "access-1"
    assert parts.idp.calls == 1


async def test_a_token_about_to_expire_waits_for_the_refresh(parts: Parts) -> None:
    parts.idp.release.clear()
    almost = await parts.expiring_in(0.5)  # within the 1 s margin: could expire on the way
    waiting = asyncio.ensure_future(parts.refresher.ensure_fresh(parts.handle, almost))
    await parts.idp.arrived.wait()
    await loop_turns()
    assert not waiting.done()
    parts.idp.release.set()
    assert (await waiting).access_token == "access-1"


async def test_a_forced_refresh_waits_for_the_new_token(parts: Parts) -> None:
    parts.idp.release.clear()
    valid = await load(parts.store, parts.handle)
    forced = asyncio.ensure_future(parts.refresher.ensure_fresh(parts.handle, valid, force=True))
    await parts.idp.arrived.wait()
    await loop_turns()
    assert not forced.done()  # its caller replays with the new token: it must have it
    parts.idp.release.set()
    assert (await forced).access_token == "access-1"


async def test_an_orphaned_lock_does_not_hold_up_a_valid_token() -> None:
    parts = await build_parts(lock_wait_s=0.3)
    # A replica that died holding the lock (or whose release a failover lost).
    assert await parts.store.acquire_lock(parts.handle, "dead-replica", 60)
    valid = await load(parts.store, parts.handle)
    started = time.monotonic()
    for _ in range(10):
        assert await parts.refresher.ensure_fresh(parts.handle, valid) is valid
    assert time.monotonic() - started < 0.1
    assert parts.idp.calls == 0
    # An expired token waits for the lock, but no longer than lock_wait_s.
    expired = await parts.expiring_in(-1)
    started = time.monotonic()
    with pytest.raises(RefreshUnavailableError):
        await parts.refresher.ensure_fresh(parts.handle, expired)
    assert time.monotonic() - started < 0.3 + 0.2
    assert parts.counted("lock_timeout") == 1
    assert parts.idp.calls == 0
    await parts.refresher.aclose()


# -- item 4: back off from a failing IdP ------------------------------------------------


class FlakyIdp:
    """Counts refresh calls where they arrive; fails them while ``down``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[float] = []  # when each call arrived, on ``clock``
        self.down = True

    async def refresh(self, session: Session) -> TokenSet:
        self.calls.append(self.clock())
        if self.down:
            raise IdpUnavailable("503")
        return TokenSet(
            access_token=f"access-{len(self.calls)}",
            expires_at=self.clock() + 3600,
            refresh_token=f"refresh-{len(self.calls)}",
        )


FIRST_S, MAX_S = 1.0, 30.0


def nominal_s(attempts: int) -> float:
    return min(MAX_S, FIRST_S * 2 ** (attempts - 1))


@dataclasses.dataclass
class Replicas:
    """Two processes (each its Refresher and metrics) on one store, one clock, one IdP."""

    clock: Clock
    store: MemorySessionStore
    idp: FlakyIdp
    handle: SessionHandle
    refreshers: list[Refresher]
    metrics: list[Metrics]

    async def request(self, replica: int) -> Session | RefreshUnavailableError:
        session = await load(self.store, self.handle)
        try:
            return await self.refreshers[replica].ensure_fresh(self.handle, session)
        except RefreshUnavailableError as exc:
            return exc

    async def backoff_until(self) -> float:
        backoff = await self.store.load_backoff(self.handle)
        assert backoff is not None
        return backoff.until

    async def aclose(self) -> None:
        for refresher in self.refreshers:
            await refresher.aclose()


async def replicas_on_one_store(expires_in_s: float = -1.0) -> Replicas:
    clock = Clock(1_000_000.0)
    store = MemorySessionStore(SessionSettings(store="memory"), clock=clock)
    handle = derive_handle(secrets.token_bytes(32))
    await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=clock() + expires_in_s,
            refresh_token="refresh-0",
            created_at=clock(),
        ),
    )
    idp = FlakyIdp(clock)
    settings = RefreshSettings(
        ahead_s=60, timeout_s=1, backoff_first_s=FIRST_S, backoff_max_s=MAX_S
    )
    metrics = [Metrics(), Metrics()]
    refreshers = [Refresher(store, idp, settings, m, clock) for m in metrics]
    return Replicas(clock, store, idp, handle, refreshers, metrics)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_backoff_grows_is_shared_and_ends_with_a_success() -> None:
    replicas = await replicas_on_one_store()
    clock, idp = replicas.clock, replicas.idp
    for attempts in range(1, 8):
        answer = await replicas.request(attempts % 2)  # the replicas take turns
        assert isinstance(answer, RefreshUnavailableError)
        assert len(idp.calls) == attempts
        until = await replicas.backoff_until()
        assert nominal_s(attempts) / 2 <= until - clock() <= nominal_s(attempts)
        # Either replica, at any moment of the backoff: no call, Retry-After = what is left.
        for replica, fraction in ((0, 0.0), (1, 0.5), (0, 0.9)):
            clock.now = until - (until - clock.now) * (1 - fraction)
            answer = await replicas.request(replica)
            assert isinstance(answer, RefreshUnavailableError)
            assert answer.headers()["Retry-After"] == str(max(1, math.ceil(until - clock())))
        assert len(idp.calls) == attempts
        clock.now = until
    idp.down = False
    answer = await replicas.request(0)
    assert isinstance(answer, Session)
    assert answer.access_token == "access-8"
    assert await replicas.store.load_backoff(replicas.handle) is None
    await replicas.aclose()


async def test_a_valid_token_is_served_during_the_backoff_without_a_call() -> None:
    replicas = await replicas_on_one_store(expires_in_s=30)  # inside ahead_s (60)
    first, second = replicas.refreshers
    session = await load(replicas.store, replicas.handle)
    assert await first.ensure_fresh(replicas.handle, session) is session
    await loop_turns()  # the refresh, in the background, fails
    assert len(replicas.idp.calls) == 1
    assert sample(replicas.metrics[0], "tokengate_refresh_backoff_sessions") == 1
    for refresher in (first, second, first, second, second):
        assert await refresher.ensure_fresh(replicas.handle, session) is session
        await loop_turns()
    assert len(replicas.idp.calls) == 1
    # The other replica read the backoff from the store once, then knew it.
    assert sample(replicas.metrics[1], "tokengate_refresh_total", result="backoff") == 1
    assert sample(replicas.metrics[1], "tokengate_refresh_backoff_sessions") == 1
    replicas.clock.now = await replicas.backoff_until()
    replicas.idp.down = False
    assert await second.ensure_fresh(replicas.handle, session) is session
    await loop_turns()
    assert (await load(replicas.store, replicas.handle)).access_token == "access-2"
    assert sample(replicas.metrics[1], "tokengate_refresh_backoff_sessions") == 0
    await replicas.aclose()


@pytest.mark.parametrize("attempts", range(1, 12))
@given(jitter=st.floats(min_value=0.5, max_value=1.0))
def test_each_interval_is_between_half_and_all_of_the_doubling_schedule(
    attempts: int, jitter: float
) -> None:
    interval = interval_s(attempts, FIRST_S, MAX_S, jitter)
    assert nominal_s(attempts) / 2 <= interval <= nominal_s(attempts) <= MAX_S
    assert retry_after_s(interval) == max(1, math.ceil(interval))


# Each step: how far the clock moves, which replica a request reaches, whether the IdP is up.
BACKOFF_STEPS = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=40),
        st.integers(min_value=0, max_value=1),
        st.booleans(),
    ),
    min_size=1,
    max_size=25,
)


@given(steps=BACKOFF_STEPS)
async def test_calls_at_a_failing_idp_keep_to_the_backoff_schedule(
    steps: list[tuple[float, int, bool]],
) -> None:
    replicas = await replicas_on_one_store()
    clock, idp = replicas.clock, replicas.idp
    failures = 0  # consecutive, before the call being checked
    last_call = 0.0
    forgotten_at = float("inf")  # the store keeps a backoff MAX_S past its end
    for advance_s, replica, up in steps:
        clock.now += advance_s
        idp.down = not up
        if clock.now >= forgotten_at:
            failures = 0
        calls_before = len(idp.calls)
        answer = await replicas.request(replica)
        if len(idp.calls) > calls_before:
            if failures:
                assert clock.now - last_call >= nominal_s(failures) / 2
            last_call = clock.now
            failures = 0 if up else failures + 1
        if isinstance(answer, RefreshUnavailableError):
            backoff = await replicas.store.load_backoff(replicas.handle)
            assert backoff is not None
            assert backoff.attempts == failures
            forgotten_at = backoff.until + MAX_S
            expected = max(1, math.ceil(backoff.until - clock.now))
            assert answer.headers()["Retry-After"] == str(expected)
        else:
            # A success: a fresh token (valid an hour) that needs no refresh for a while.
            assert up or answer.access_expires_at > clock.now
            await replicas.store.save(
                replicas.handle, dataclasses.replace(answer, access_expires_at=clock.now - 1)
            )
    await replicas.aclose()


# -- item 1: a rotated refresh token is never dropped ------------------------------------


class FlakyStore(MemorySessionStore):
    """The memory store, whose writes (and, with ``loads_fail``, reads) fail while
    ``failing_saves`` lasts, as Redis does in a failover; counts writes where they land."""

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(SessionSettings(store="memory"), **({"clock": clock} if clock else {}))
        self.failing_saves = 0  # the next this many saves fail; -1: all of them
        self.loads_fail = False
        self.written: list[Session] = []
        self.landed = asyncio.Event()

    async def save(self, handle: SessionHandle, session: Session) -> Session | None:
        if self.failing_saves:
            self.failing_saves -= self.failing_saves > 0
            raise SessionStoreUnavailableError()
        saved = await super().save(handle, session)
        if saved is not None:
            self.written.append(saved)
            self.landed.set()
        return saved

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        if self.loads_fail and self.failing_saves:
            raise SessionStoreUnavailableError()
        return await super().load(handle, cached=cached)


@dataclasses.dataclass
class LateParts:
    store: FlakyStore
    idp: ScriptedIdp
    refresher: Refresher
    handle: SessionHandle
    metrics: Metrics
    stale: Session

    def counted(self, result: str) -> float:
        return sample(self.metrics, "tokengate_refresh_total", result=result)


async def late_parts(timeout_s: float = 1.0) -> LateParts:
    store = FlakyStore()
    handle = derive_handle(secrets.token_bytes(32))
    await store.create(
        handle,
        Session(
            subject="alice",
            access_token="access-0",
            access_expires_at=time.time() - 1,  # expired: requests wait for the refresh
            refresh_token="refresh-0",
            created_at=time.time(),
        ),
    )
    metrics = Metrics()
    idp = ScriptedIdp()
    refresher = Refresher(store, idp, RefreshSettings(ahead_s=60, timeout_s=timeout_s), metrics)
    return LateParts(store, idp, refresher, handle, metrics, await load(store, handle))


async def test_a_rotated_token_is_saved_late_and_served_meanwhile() -> None:
    parts = await late_parts()
    parts.store.failing_saves = 3
    refreshed = await parts.refresher.ensure_fresh(parts.handle, parts.stale)
    assert (refreshed.access_token, refreshed.refresh_token) == ("access-1", "refresh-1")
    assert parts.store.written == []  # not stored yet
    # Requests still reading the old session (expired, its refresh token spent) get the
    # rotated tokens at once, and never refresh with the spent one.
    for _ in range(5):
        served = await parts.refresher.ensure_fresh(parts.handle, parts.stale)
        assert served.access_token == "access-1"
    assert sample(parts.metrics, "tokengate_refresh_saves_pending") == 1
    await asyncio.wait_for(parts.store.landed.wait(), timeout=5)
    await parts.store.wait_for_unlock(parts.handle, 5)  # the late write let the lock go
    assert [s.refresh_token for s in parts.store.written] == ["refresh-1"]
    assert (await load(parts.store, parts.handle)).version == parts.stale.version + 1
    assert parts.idp.calls == 1
    await parts.refresher.aclose()
    assert parts.counted("saved_late") == 1
    assert parts.counted("save_lost") == 0
    assert sample(parts.metrics, "tokengate_refresh_saves_pending") == 0
    assert parts.refresher.held(parts.handle.storage_id) is None


async def test_a_write_that_cannot_be_made_within_the_lock_ttl_is_lost_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts = await late_parts(timeout_s=0.1)  # lock TTL 2.2 s: writes retried for 1.2 s
    parts.store.failing_saves = -1
    started = time.monotonic()
    refreshed = await parts.refresher.ensure_fresh(parts.handle, parts.stale)
    assert refreshed.access_token == "access-1"
    await parts.store.wait_for_unlock(parts.handle, 5)  # given up, and the lock released
    assert 1.0 < time.monotonic() - started < 2.2
    assert parts.counted("save_lost") == 1
    assert parts.refresher.held(parts.handle.storage_id) is None
    lost = [r for r in caplog.records if r.getMessage() == "refresh_save_lost"]
    assert [r.levelname for r in lost] == ["ERROR"]
    assert "access-1" not in caplog.text
    assert "refresh-1" not in caplog.text
    await parts.refresher.aclose()
    assert sample(parts.metrics, "tokengate_refresh_saves_pending") == 0


async def test_a_write_pending_at_shutdown_gets_one_last_attempt() -> None:
    parts = await late_parts()
    parts.store.failing_saves = -1
    await parts.refresher.ensure_fresh(parts.handle, parts.stale)
    parts.store.failing_saves = 0  # the store is back as the process stops
    started = time.monotonic()
    await parts.refresher.aclose()
    assert time.monotonic() - started < 0.5
    assert [s.refresh_token for s in parts.store.written] == ["refresh-1"]
    assert parts.counted("saved_late") == 1


async def test_a_write_whose_reply_was_lost_counts_as_saved() -> None:
    parts = await late_parts()

    class LostReply(FlakyStore):
        async def save(self, handle: SessionHandle, session: Session) -> Session | None:
            saved = await MemorySessionStore.save(self, handle, session)
            if self.failing_saves:  # written, but the reply never came back
                self.failing_saves -= 1
                raise SessionStoreUnavailableError()
            return saved

    store = LostReply()
    handle = parts.handle
    await store.create(handle, parts.stale)
    refresher = Refresher(store, parts.idp, RefreshSettings(ahead_s=60, timeout_s=1), parts.metrics)
    store.failing_saves = 1
    stale = await load(store, handle)
    assert (await refresher.ensure_fresh(handle, stale)).access_token == "access-1"
    await store.wait_for_unlock(handle, 5)
    await refresher.aclose()
    assert (await load(store, handle)).refresh_token == "refresh-1"
    assert parts.counted("saved_late") == 1
    assert parts.counted("conflict") == 0


async def test_requests_get_the_held_tokens_while_the_store_cannot_load() -> None:
    parts = await late_parts()
    parts.store.failing_saves = -1
    secret = b"q" * 32
    handle = derive_handle(secret)
    await parts.store.create(handle, parts.stale)
    settings = SessionSettings(store="memory")
    authenticator = SessionAuthenticator(
        SessionCookies(settings),
        parts.store,
        parts.refresher,
        CsrfSettings(),
        "https://app.example",
        principals_kept=8,
        absolute_timeout_s=settings.absolute_timeout_s,
    )
    await parts.refresher.ensure_fresh(handle, await load(parts.store, handle))  # write pending
    parts.store.loads_fail = True  # Redis away: the request's own load fails too
    cookie = f"{settings.cookie_name}={encode_secret(secret)}"
    request = make_mocked_request("GET", "/api", headers={"Cookie": cookie, "X-CSRF": "1"})
    principal = await authenticator.authenticate(request, ROUTE)
    assert principal.access_token == "access-1"
    other = b"o" * 32  # a session with no refresh held: the store's outage shows
    cookie = f"{settings.cookie_name}={encode_secret(other)}"
    request = make_mocked_request("GET", "/api", headers={"Cookie": cookie, "X-CSRF": "1"})
    with pytest.raises(SessionStoreUnavailableError):
        await authenticator.authenticate(request, ROUTE)
    parts.store.failing_saves = 0
    await parts.refresher.aclose()


def test_settings_refuse_a_wait_past_the_command_timeout_and_a_shrinking_backoff() -> None:
    with pytest.raises(ValueError, match="wait_timeout_s"):
        SessionSettings(redis_timeout_s=0.5, wait_replicas=1, wait_timeout_s=0.5)
    with pytest.raises(ValueError, match="backoff_first_s"):
        RefreshSettings(backoff_first_s=40, backoff_max_s=30)

"""One ``SessionStore`` behaviour suite, run against memory, fakeredis and a real redis-server.

Time is injected: a ``SkewClock`` follows the wall clock plus an offset the tests move, and
on Redis backends ``Backend.elapse`` also shortens every key's TTL by the same amount, so
timeouts are checked without waiting for them.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, cast

import fakeredis
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from gateway.errors import SessionStoreUnavailableError
from gateway.metrics import Metrics
from gateway.sessions.crypto import derive_handle
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import LoginState, Session, SessionHandle, SessionStore
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration

IDLE_S = 60
ABSOLUTE_S = 150
PREFIX = "tg"
T = TypeVar("T")


class SkewClock:
    """Wall time plus an offset that tests move forward."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


@dataclass
class Backend:
    name: str
    store: SessionStore
    clock: SkewClock
    metrics: Metrics = field(default_factory=Metrics)
    raw: Redis | None = None  # the same data, unencrypted access (Redis backends)
    outage: Callable[[], object] | None = None
    recovery: Callable[[], object] | None = None

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass for the clock and for every TTL the backend keeps."""
        self.clock.offset_s += seconds
        if self.raw is None:
            return
        async for key in self.raw.scan_iter():
            ttl_ms = await self.raw.pttl(key)
            if ttl_ms < 0:
                continue
            if ttl_ms <= seconds * 1000:
                await self.raw.delete(key)
            else:
                await self.raw.pexpire(key, ttl_ms - int(seconds * 1000))

    def require_raw(self) -> Redis:
        assert self.raw is not None, f"{self.name} keeps no bytes outside this process"
        return self.raw

    def errors(self) -> float:
        value = self.metrics.registry.get_sample_value("tokengate_session_store_errors_total")
        return value or 0.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServerProcess]:
    with RedisServerProcess() as server:
        yield server


def session_settings(redis_url: str = "redis://127.0.0.1:6379/0") -> SessionSettings:
    return SessionSettings(
        redis_url=redis_url,
        key_prefix=PREFIX,
        idle_timeout_s=IDLE_S,
        absolute_timeout_s=ABSOLUTE_S,
    )


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async for built in build_backend(request):
        yield built


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The backends that keep bytes outside this process and can be cut off."""
    async for built in build_backend(request):
        yield built


async def build_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = SkewClock()
    if request.param == "memory":
        memory = Backend("memory", MemorySessionStore(session_settings(), clock=clock), clock)
        yield memory
        await memory.store.aclose()
        return
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        metrics = Metrics()
        fake = Backend(
            "fakeredis",
            RedisSessionStore(
                session_settings(), fakeredis.FakeAsyncRedis(server=server), metrics, clock
            ),
            clock,
            metrics,
            raw=fakeredis.FakeAsyncRedis(server=server),
            outage=lambda: setattr(server, "connected", False),
            recovery=lambda: setattr(server, "connected", True),
        )
        yield fake
        await fake.store.aclose()
        await fake.require_raw().aclose()
        return
    redis_server: RedisServerProcess = request.getfixturevalue("redis_server")
    settings = session_settings(redis_server.url)
    raw = Redis.from_url(redis_server.url)
    await raw.flushall()
    metrics = Metrics()
    real = Backend(
        "redis",
        RedisSessionStore(settings, build_redis(settings), metrics, clock),
        clock,
        metrics,
        raw=raw,
        outage=redis_server.kill,
        recovery=redis_server.restart,
    )
    yield real
    await real.store.aclose()
    await raw.aclose()
    if not redis_server.running:
        redis_server.restart()  # a fault test stopped it: later tests need it back


def new_handle() -> tuple[bytes, SessionHandle]:
    secret = secrets.token_bytes(32)
    return secret, derive_handle(secret)


def jwt_like(label: str, size_bytes: int) -> str:
    body = base64.urlsafe_b64encode(secrets.token_bytes(size_bytes * 3 // 4)).decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{label}{body}"[:size_bytes]


def make_session(subject: str = "alice@example.test", sid: str | None = "idp-sid-1") -> Session:
    return Session(
        subject=subject,
        access_token=jwt_like("ACCESS", 1024),
        access_expires_at=time.time() + 300,
        refresh_token=jwt_like("REFRESH", 200),
        id_token=jwt_like("IDTOKEN", 900),
        scopes=("openid", "profile", "api.read"),
        claims={"sub": subject, "name": "Alice Example", "email": subject},
        idp_session_id=sid,
    )


def login_state() -> LoginState:
    return LoginState(
        binding="binding-digest",
        code_verifier="verifier-" + secrets.token_urlsafe(32),
        nonce="nonce-1",
        return_to="/app",
        created_at=time.time(),
    )


def session_key(handle: SessionHandle) -> str:
    return f"{PREFIX}:{{{handle.storage_id}}}:s"


# -- sessions -----------------------------------------------------------------------------


async def test_created_session_loads_back_as_version_1(backend: Backend) -> None:
    _, handle = new_handle()
    created = await backend.store.create(handle, make_session())
    assert created.version == 1
    assert created.created_at == pytest.approx(backend.clock(), abs=1)
    assert await backend.store.load(handle) == created


async def test_unknown_or_wrong_key_handle_loads_nothing(backend: Backend) -> None:
    _, handle = new_handle()
    await backend.store.create(handle, make_session())
    wrong_key = SessionHandle(storage_id=handle.storage_id, key=secrets.token_bytes(32))
    assert await backend.store.load(wrong_key) is None
    assert await backend.store.load(new_handle()[1]) is None


async def test_load_slides_the_idle_timeout(backend: Backend) -> None:
    _, handle = new_handle()
    await backend.store.create(handle, make_session())
    for _ in range(2):  # 100 s in all, more than the 60 s idle timeout
        await backend.elapse(IDLE_S - 10)
        assert await backend.store.load(handle) is not None


async def test_session_left_idle_past_the_timeout_is_gone(backend: Backend) -> None:
    _, handle = new_handle()
    await backend.store.create(handle, make_session())
    await backend.elapse(IDLE_S + 1)
    assert await backend.store.load(handle) is None


async def test_absolute_timeout_ends_even_an_active_session(backend: Backend) -> None:
    _, handle = new_handle()
    await backend.store.create(handle, make_session())
    for _ in range(3):
        await backend.elapse(45)
        assert await backend.store.load(handle) is not None  # at 135 s: 15 s are left
    if backend.raw is not None:  # the TTL never reaches past created_at + absolute
        assert 13_000 < await backend.raw.pttl(session_key(handle)) <= 15_000
    await backend.elapse(14)
    assert await backend.store.load(handle) is not None
    await backend.elapse(2)
    assert await backend.store.load(handle) is None


async def test_load_past_the_absolute_deadline_deletes_a_session_redis_still_holds(
    backend: Backend,
) -> None:
    _, handle = new_handle()
    await backend.store.create(handle, make_session())
    backend.clock.offset_s += ABSOLUTE_S + 1  # the clock moves, the TTLs do not
    assert await backend.store.load(handle) is None
    if backend.raw is not None:
        assert not await backend.raw.exists(session_key(handle))


async def test_save_is_compare_and_set_on_the_version(backend: Backend) -> None:
    _, handle = new_handle()
    created = await backend.store.create(handle, make_session())
    fresh = created.with_tokens(
        access_token="at-2", access_expires_at=1.0, refresh_token="rt-2", id_token=None
    )
    saved = await backend.store.save(handle, fresh)
    assert saved is not None
    assert saved.version == 2
    late = created.with_tokens(
        access_token="at-late", access_expires_at=1.0, refresh_token="rt-late", id_token=None
    )
    assert await backend.store.save(handle, late) is None  # version 1 is stale
    loaded = await backend.store.load(handle)
    assert loaded is not None
    assert (loaded.access_token, loaded.refresh_token, loaded.version) == ("at-2", "rt-2", 2)
    again = await backend.store.save(handle, loaded)
    assert again is not None
    assert again.version == 3


async def test_save_after_delete_returns_none_and_does_not_resurrect(backend: Backend) -> None:
    _, handle = new_handle()
    created = await backend.store.create(handle, make_session())
    assert await backend.store.delete(handle) is True
    assert await backend.store.save(handle, created) is None
    assert await backend.store.load(handle) is None
    assert await backend.store.delete(handle) is False


async def test_delete_frees_the_sessions_lock(backend: Backend) -> None:
    _, handle = new_handle()
    await backend.store.create(handle, make_session())
    assert await backend.store.acquire_lock(handle, "token-1", 30)
    await backend.store.delete(handle)
    assert await backend.store.acquire_lock(handle, "token-2", 30)


async def test_delete_by_subject_ends_exactly_that_subjects_sessions(backend: Backend) -> None:
    store = backend.store
    alice = [new_handle()[1] for _ in range(3)]
    bob = new_handle()[1]
    for number, handle in enumerate(alice):
        await store.create(handle, make_session("alice", sid=f"sid-{number}"))
    await store.create(bob, make_session("bob", sid="sid-0"))
    await store.delete(alice[2])  # already ended: not counted again
    assert await store.delete_by_subject("alice") == 2
    assert [await store.load(handle) for handle in alice] == [None, None, None]
    assert await store.load(bob) is not None
    assert await store.delete_by_subject("alice") == 0


async def test_delete_by_idp_session_ends_exactly_that_sids_sessions(backend: Backend) -> None:
    store = backend.store
    first, second, other, no_sid = (new_handle()[1] for _ in range(4))
    await store.create(first, make_session("alice", sid="sid-A"))
    await store.create(second, make_session("alice", sid="sid-A"))
    await store.create(other, make_session("alice", sid="sid-B"))
    await store.create(no_sid, make_session("alice", sid=None))
    assert await store.delete_by_idp_session("sid-A") == 2
    assert await store.load(first) is None
    assert await store.load(second) is None
    assert await store.load(other) is not None
    assert await store.load(no_sid) is not None
    assert await store.delete_by_idp_session("sid-A") == 0


# -- login states and once-only values ----------------------------------------------------


async def test_login_state_can_be_taken_once(backend: Backend) -> None:
    key, login = secrets.token_bytes(32), login_state()
    await backend.store.put_login_state("state-1", key, login, 600)
    assert await backend.store.take_login_state("state-1", key) == login
    assert await backend.store.take_login_state("state-1", key) is None


async def test_login_state_with_the_wrong_key_reads_nothing_and_is_spent(
    backend: Backend,
) -> None:
    key = secrets.token_bytes(32)
    await backend.store.put_login_state("state-1", key, login_state(), 600)
    assert await backend.store.take_login_state("state-1", secrets.token_bytes(32)) is None
    assert await backend.store.take_login_state("state-1", key) is None


async def test_login_state_expires(backend: Backend) -> None:
    key = secrets.token_bytes(32)
    await backend.store.put_login_state("state-1", key, login_state(), 30)
    await backend.elapse(31)
    assert await backend.store.take_login_state("state-1", key) is None


async def test_remember_once_is_true_once_per_namespace_and_ttl(backend: Backend) -> None:
    store = backend.store
    assert await store.remember_once("jti", "token-id-1", 60) is True
    assert await store.remember_once("jti", "token-id-1", 60) is False
    assert await store.remember_once("logout", "token-id-1", 60) is True
    await backend.elapse(61)
    assert await store.remember_once("jti", "token-id-1", 60) is True


# -- the refresh lock ---------------------------------------------------------------------


async def test_lock_is_exclusive_and_released_only_with_its_token(backend: Backend) -> None:
    store, handle = backend.store, new_handle()[1]
    assert await store.acquire_lock(handle, "token-1", 30) is True
    assert await store.acquire_lock(handle, "token-2", 30) is False
    assert await store.release_lock(handle, "token-2") is False
    assert await store.release_lock(handle, "token-1") is True
    assert await store.acquire_lock(handle, "token-2", 30) is True


async def test_lock_ttl_expiry_frees_it_and_voids_the_old_token(backend: Backend) -> None:
    store, handle = backend.store, new_handle()[1]
    assert await store.acquire_lock(handle, "token-1", 30)
    await backend.elapse(31)
    assert await store.acquire_lock(handle, "token-2", 30)
    assert await store.release_lock(handle, "token-1") is False
    assert await store.acquire_lock(handle, "token-3", 30) is False


async def test_wait_for_unlock_returns_at_once_when_unlocked(backend: Backend) -> None:
    await asyncio.wait_for(backend.store.wait_for_unlock(new_handle()[1], 30), 1.0)


async def test_wait_for_unlock_wakes_promptly_on_release(backend: Backend) -> None:
    store, handle = backend.store, new_handle()[1]
    assert await store.acquire_lock(handle, "token-1", 30)
    waiter = asyncio.create_task(store.wait_for_unlock(handle, 30))
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    assert not done  # still locked: still waiting
    loop = asyncio.get_running_loop()
    released_at = loop.time()
    assert await store.release_lock(handle, "token-1")
    await asyncio.wait_for(waiter, 1.0)
    assert loop.time() - released_at < 0.2  # Redis polls at most 50 ms apart


async def test_wait_for_unlock_returns_when_the_lock_ttl_runs_out(backend: Backend) -> None:
    store, handle = backend.store, new_handle()[1]
    assert await store.acquire_lock(handle, "token-1", 0.1)
    await asyncio.wait_for(store.wait_for_unlock(handle, 30), 2.0)
    assert await store.acquire_lock(handle, "token-2", 30)


async def test_wait_for_unlock_gives_up_at_its_timeout(backend: Backend) -> None:
    store, handle = backend.store, new_handle()[1]
    assert await store.acquire_lock(handle, "token-1", 30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(store.wait_for_unlock(handle, 0.05), 1.0)
    assert loop.time() - started >= 0.045
    assert await store.acquire_lock(handle, "token-2", 30) is False


# -- what Redis holds ---------------------------------------------------------------------


def typed(reply: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types some replies "sync or async"; on an asyncio client they are awaitable."""
    return cast(Awaitable[T], reply)


async def raw_dump(raw: Redis) -> bytes:
    """Every key and value, as the bytes a leaked dump or a MONITOR would show."""
    chunks: list[bytes] = []
    async for key in raw.scan_iter():
        chunks.append(key)
        chunks.append(await raw.dump(key) or b"")
        kind = (await raw.type(key)).decode()
        if kind == "hash":
            for name, value in (await typed(raw.hgetall(key))).items():
                chunks += [name, value]
        elif kind == "set":
            chunks += sorted(await typed(raw.smembers(key)))
        elif kind == "string":
            chunks.append(await raw.get(key) or b"")
    return b"\n".join(chunks)


async def test_a_redis_dump_reveals_no_token_identifier_or_cookie(redis_backend: Backend) -> None:
    raw = redis_backend.require_raw()
    secret, handle = new_handle()
    session = make_session("alice@example.test", sid="idp-sid-secret")
    await redis_backend.store.create(handle, session)
    login_key, login = secrets.token_bytes(32), login_state()
    await redis_backend.store.put_login_state("state-secret", login_key, login, 600)
    await redis_backend.store.remember_once("jti", "jti-secret", 600)
    dump = await raw_dump(raw)
    assert handle.storage_id.encode() in dump  # the dump is real: it shows the hashed id
    needles = {
        "access token": session.access_token.encode(),
        "refresh token": (session.refresh_token or "").encode(),
        "id token": (session.id_token or "").encode(),
        "subject": b"alice@example.test",
        "sid": b"idp-sid-secret",
        "cookie secret": secret,
        "cookie secret (hex)": secret.hex().encode(),
        "cookie value": base64.urlsafe_b64encode(secret).rstrip(b"="),
        "session key": handle.key,
        "session key (hex)": handle.key.hex().encode(),
        "state": b"state-secret",
        "code verifier": login.code_verifier.encode(),
        "login key": login_key,
        "jti": b"jti-secret",
    }
    assert [name for name, needle in needles.items() if needle in dump] == []


async def test_a_tampered_session_blob_reads_as_none(redis_backend: Backend) -> None:
    raw = redis_backend.require_raw()
    _, handle = new_handle()
    await redis_backend.store.create(handle, make_session())
    key = session_key(handle)
    # Typed for decode_responses=True clients; this one returns bytes and takes them.
    blob = bytearray(cast(bytes, await typed(raw.hget(key, "d"))))
    blob[-1] ^= 0x01
    await typed(raw.hset(key, "d", cast(str, bytes(blob))))
    assert await redis_backend.store.load(handle) is None


async def test_a_login_blob_moved_to_another_state_reads_as_none(redis_backend: Backend) -> None:
    raw = redis_backend.require_raw()
    key = secrets.token_bytes(32)  # one browser, two logins: the same binding key
    await redis_backend.store.put_login_state("state-1", key, login_state(), 600)
    await redis_backend.store.put_login_state("state-2", key, login_state(), 600)
    keys = sorted([k async for k in raw.scan_iter(f"{PREFIX}:login:*")])
    first, second = await raw.get(keys[0]), await raw.get(keys[1])
    await raw.set(keys[0], second or b"")
    await raw.set(keys[1], first or b"")
    assert await redis_backend.store.take_login_state("state-1", key) is None
    assert await redis_backend.store.take_login_state("state-2", key) is None


async def test_redis_down_is_session_store_unavailable_and_counted(redis_backend: Backend) -> None:
    assert redis_backend.outage is not None
    assert redis_backend.recovery is not None
    _, handle = new_handle()
    await redis_backend.store.create(handle, make_session())
    redis_backend.outage()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: redis_backend.store.load(handle),
        lambda: redis_backend.store.create(new_handle()[1], make_session()),
        lambda: redis_backend.store.acquire_lock(handle, "token-1", 30),
        lambda: redis_backend.store.delete_by_subject("alice@example.test"),
    ]
    for call in calls:
        with pytest.raises(SessionStoreUnavailableError):
            await call()
    assert redis_backend.errors() == len(calls)
    assert await redis_backend.store.ping() is False
    redis_backend.recovery()
    assert await redis_backend.store.ping() is True  # the same client reconnects


async def test_ping_answers_true_when_the_backend_is_up(backend: Backend) -> None:
    assert await backend.store.ping() is True


# -- building the client ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/2", Redis),
        ("rediss://cache.example.test:6380/0", Redis),
        ("unix:///run/redis/redis.sock?db=1", Redis),
        ("redis+cluster://10.0.0.1:7000", RedisCluster),
        ("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/tokengate/3", Redis),
    ],
)
async def test_build_redis_understands_every_url_form(url: str, kind: type) -> None:
    client = build_redis(session_settings(url))
    try:
        assert isinstance(client, kind)
        if isinstance(client, Redis):
            options = client.connection_pool.connection_kwargs
            # Half of redis_timeout_s (2 s) a try: the one retry fits in a request's deadline.
            assert options["socket_timeout"] == options["socket_connect_timeout"] == 1.0
    finally:
        await client.aclose()


async def test_build_redis_finds_the_sentinel_master_by_service_name() -> None:
    url = "redis+sentinel://:pw@10.0.0.1:26379,[::1]/tokengate/3"
    client = build_redis(session_settings(url))
    try:
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "tokengate"
        assert pool.connection_kwargs["db"] == 3
        assert pool.connection_kwargs["password"] == "pw"
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26379), ("::1", 26379)]
    finally:
        await client.aclose()


def test_a_sentinel_url_without_service_name_is_refused() -> None:
    with pytest.raises(ValueError, match="service_name"):
        build_redis(session_settings("redis+sentinel://10.0.0.1:26379"))

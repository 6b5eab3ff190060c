"""The session store in Redis (standalone, Sentinel or Cluster), and the client it runs on.

Key layout, with ``p`` = ``session.key_prefix`` and ``<id>`` a session's storage id (64 hex):

    p:{<id>}:s              HASH  v version, d sealed session JSON, c created_at (ms)
                                  PTTL = min(idle, created_at + absolute - now), slid by load
    p:{<id>}:lock           STRING the refresh lock's random token, PX = lock TTL
    p:{<id>}:backoff        STRING "<attempts>:<until ms>" after failed refreshes: no replica
                                  asks the IdP before until; PX = its interval + the
                                  longest one, so consecutive failures keep counting
    p:sub:<sha256(sub)>     SET   storage ids of the subject's sessions, PTTL = the newest
                                  session's remaining absolute timeout (only ever grows)
    p:sid:<sha256(sid)>     SET   the same for the IdP's session id (back-channel logout)
    p:login:<sha256(state)> STRING a pending login, sealed with the login-binding key
    p:once:<ns>:<sha256(v)> STRING "1", SET NX EX: a value seen once (jti replay)
    p:invalidate            pub/sub channel, published by the scripts below in the same step
                                  as their write; its messages are ``feed``'s to define
                                  and parse (``invalidation_message``, ``unlock_message``)

The ``{<id>}`` hash tag puts a session, its lock and its backoff in one Cluster slot; every
script touches one slot. Index entries of ended sessions are pruned when the subject logs in again
and when the index is used. A dump shows hashes and ciphertext, never a token, a subject
or a cookie. A typical session (1 KB access token, 200 B refresh token, 900 B ID token,
three claims: 2.4 KB of JSON) is one HASH of 2.9 KB (``MEMORY USAGE``, Redis 7.0) plus two
index SETs of 310 bytes each.
The cookie, the crypto and the refresh protocol live in their own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from opentelemetry.trace import SpanKind, Tracer
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.event import EventDispatcher
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import SessionStoreUnavailableError
from gateway.metrics import Metrics
from gateway.sessions.crypto import (
    digest,
    open_sealed,
    open_session,
    seal,
    seal_session,
    slot_aad,
)
from gateway.sessions.deadline import bounded, deadline_of_call
from gateway.sessions.feed import (
    InvalidationFeed,
    RedisSubscriber,
    Wakeups,
    channel_of,
    invalidation_message,
    unlock_message,
)
from gateway.sessions.local_cache import LocalSessionCache
from gateway.sessions.model import (
    LoginState,
    RefreshBackoff,
    Session,
    SessionHandle,
    SessionWatch,
)
from gateway.settings import SessionSettings
from gateway.tracing import NO_TRACER

log = logging.getLogger(__name__)

RedisClient = Redis | RedisCluster
_T = TypeVar("_T")

_HEALTH_CHECK_INTERVAL_S = 30.0  # PING a pooled connection idle longer than this first
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05
# With the invalidation feed up, a release is published and wakes a waiting replica; it
# still looks this often, for a lock whose holder died (its TTL runs out, unpublished).
_POLL_WITH_FEED_S = 0.25

# KEYS[1] session hash. ARGV[1] now ms, ARGV[2] idle ms, ARGV[3] absolute ms.
# Returns {version, sealed data}, or nil when absent or past the absolute timeout (deleted).
_LOAD_AND_TOUCH = """
local f = redis.call('HMGET', KEYS[1], 'v', 'd', 'c')
if not f[1] or not f[2] or not f[3] then return nil end
local remaining = tonumber(f[3]) + tonumber(ARGV[3]) - tonumber(ARGV[1])
if remaining <= 0 then
  redis.call('DEL', KEYS[1])
  return nil
end
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[2]), remaining))
return {f[1], f[2]}
"""

# KEYS[1] session hash. ARGV[1] sealed data, ARGV[2] created_at ms, ARGV[3] TTL ms.
# Returns 1 (version 1 written).
_CREATE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', 1, 'd', ARGV[1], 'c', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] session hash. ARGV[1] expected version, ARGV[2] sealed data, ARGV[3] now ms,
# ARGV[4] idle ms, ARGV[5] absolute ms, ARGV[6] invalidation channel, ARGV[7] the message
# (feed.invalidation_message). Returns the new version; 0 when the stored version differs;
# nil when the session is gone (never recreated: a logout racing a refresh stays a logout).
# A write is published, in the same step, so no replica keeps an old copy (local_cache).
_COMPARE_AND_SET = """
local f = redis.call('HMGET', KEYS[1], 'v', 'c')
if not f[1] or not f[2] then return nil end
if f[1] ~= ARGV[1] then return 0 end
local remaining = tonumber(f[2]) + tonumber(ARGV[5]) - tonumber(ARGV[3])
if remaining <= 0 then
  redis.call('DEL', KEYS[1])
  return nil
end
local v = tonumber(f[1]) + 1
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[4]), remaining))
redis.call('PUBLISH', ARGV[6], ARGV[7])
return v
"""

# KEYS[1] session hash, KEYS[2] its lock, KEYS[3] its refresh backoff (same slot). ARGV[1]
# invalidation channel, ARGV[2] the message (feed.invalidation_message). Returns 1 if the
# session existed, else 0; an end is published in the same step.
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
if existed == 1 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return existed
"""

# KEYS[1] index set. ARGV[1] storage id, ARGV[2] TTL ms. Adds the id; the TTL only grows.
# Returns 1.
_INDEX = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS[1] lock. ARGV[1] our token, ARGV[2] invalidation channel, ARGV[3] the message
# (feed.unlock_message).
# Returns 1 when released (and published, so waiting replicas look again), 0 when the lock
# is not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


class _SentinelMaster(Redis):
    """The master's client; closing it also closes the connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in list(pool.sentinel_manager.sentinels):  # a lookup may reorder it
                await sentinel.aclose()


def build_redis(settings: SessionSettings) -> RedisClient:
    """A client for ``redis_url``; connections open lazily, on the first command. A URL this
    cannot build raises ``ValueError`` (``check-config`` builds it too, so it fails there)."""
    url = settings.redis_url
    # Each try gets half of redis_timeout_s: a request's store calls share one deadline of
    # redis_timeout_s (sessions.deadline), and the one retry below must fit in it, or a
    # pooled connection that died silently (a NAT forgot it) costs the whole request.
    attempt_s = settings.redis_timeout_s / 2
    options: dict[str, Any] = {
        "socket_timeout": attempt_s,
        "socket_connect_timeout": attempt_s,
        "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
        # One quick retry covers a pooled connection the server closed (restart, failover);
        # redis-py's default backs off for seconds, which a request cannot afford.
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), retries=1),
    }
    scheme = urlsplit(url).scheme
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _build_cluster(url, options)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _build_sentinel_master(url, options)
    return Redis.from_url(url, **options)


@dataclass(frozen=True, slots=True)
class MultiHostUrl:
    """``scheme://[user:password@]host:port[,host:port...][/path][?name=value...]``, as
    Sentinel and Cluster URLs list several servers (``urllib`` reads one host only)."""

    username: str | None
    password: str | None = field(repr=False)
    nodes: tuple[tuple[str, int], ...]
    path: tuple[str, ...]  # the percent-decoded, non-empty path segments
    query: dict[str, str] = field(repr=False)  # percent-decoded; may hold a password


def parse_multi_host_url(url: str, default_port: int) -> MultiHostUrl:
    rest = url.split("://", 1)[1]
    if "#" in rest:
        raise ValueError("must not carry a fragment")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        node = urlsplit("//" + item)
        port = node.port  # ValueError for a port that is not a number in 0-65535
        if not node.hostname:
            raise ValueError(f"{item!r} is not host:port")
        nodes.append((node.hostname, port or default_port))
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("a query parameter is given twice")
    return MultiHostUrl(
        username=unquote(username) or None,
        password=unquote(password) or None,
        nodes=tuple(nodes),
        path=tuple(unquote(part) for part in path.split("/") if part),
        query=dict(pairs),
    )


def _tls_options(url: str, parsed: MultiHostUrl, allowed: set[str]) -> dict[str, Any]:
    """redis-py's TLS options for a ``rediss+`` URL (certificates checked against the system's
    CAs, or ``ssl_ca_certs``, and the host name), none for ``redis+``; refuses a query
    parameter outside ``allowed`` (and ``ssl_ca_certs`` for ``rediss+``)."""
    tls = url.startswith("rediss+")
    unknown = set(parsed.query) - allowed - ({"ssl_ca_certs"} if tls else set())
    if unknown:
        raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r}")
    if not tls:
        return {}
    return {"ssl": True, "ssl_ca_certs": parsed.query.get("ssl_ca_certs")}


def _build_cluster(url: str, options: dict[str, Any]) -> RedisCluster:
    # redis+cluster://[user:password@]h1:p1[,h2:p2...][/0]: every listed node is a seed, so
    # start-up survives any one of them being down (redis-py's from_url takes one host).
    parsed = parse_multi_host_url(url, _REDIS_PORT)
    if parsed.path not in ((), ("0",)):
        raise ValueError("expected redis+cluster://host:port[,host:port...] (db 0 only)")
    return _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        **_tls_options(url, parsed, set()),
        **options,
    )


class _ClusterConnection(Connection):
    """A connection to a cluster node. redis-py's cluster client answers CLUSTERDOWN (and
    every fifth MOVED) by disconnecting every node, connections other commands are using
    included; a command caught between connecting and writing then found no writer and
    raised ``AttributeError``, which no caller expects. It fails here as a connection the
    server closed does: the client retries it, the store reports Redis unavailable. (Our
    clients always have a ``socket_timeout``, so redis-py writes through this method.)"""

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        if self._writer is None:
            raise RedisConnectionError("closed by another command")
        await super()._send_packed_command(command)


class _ClusterSSLConnection(_ClusterConnection, SSLConnection):
    pass


class _ClusterNodes(NodesManager):
    """redis-py 7.4's view of the cluster, its slot table pointing at the nodes it keeps.

    ``initialize`` runs again after every connection error, CLUSTERDOWN and fifth MOVED (a
    failover brings dozens) and builds new ``ClusterNode`` objects from CLUSTER SLOTS. The
    node table keeps the object it had for a known address, but redis-py 7.4 routes by a
    slot table of the new ones: commands open connections on objects that ``aclose`` never
    reaches, and the next refresh drops them still connected, each an "Unclosed ClusterNode
    object" error line and leaked sockets (115-170 in a 5 s failover with 8 busy tasks).
    redis-py 8.0 rebuilds the slot table from the kept nodes (redis/redis-py#4057); so does
    this, and it gives them the role the refresh found (a promoted replica is a primary)."""

    __slots__ = ()

    async def initialize(self) -> None:
        await super().initialize()
        # No await since super() set the slot table: no command has used the new objects.
        kept = self.nodes_cache
        rebuilt: dict[int, list[ClusterNode]] = {}  # by id: a range of slots shares a list
        for slot, found in self.slots_cache.items():
            nodes = rebuilt.get(id(found))
            if nodes is None:
                nodes = []
                for node in found:
                    known = kept.setdefault(node.name, node)
                    known.server_type = node.server_type
                    nodes.append(known)
                rebuilt[id(found)] = nodes
            self.slots_cache[slot] = nodes


class _Cluster(RedisCluster):
    """``RedisCluster`` with the two repairs above: its nodes' connections are
    ``_ClusterConnection`` and its view of the cluster is ``_ClusterNodes``."""

    def __init__(self, *, startup_nodes: list[ClusterNode], **options: Any) -> None:
        dispatcher = EventDispatcher()
        super().__init__(startup_nodes=startup_nodes, event_dispatcher=dispatcher, **options)
        kwargs = self.connection_kwargs  # what every node is built with from now on
        kwargs["connection_class"] = (
            _ClusterSSLConnection if options.get("ssl") else _ClusterConnection
        )
        self.nodes_manager = _ClusterNodes(
            [ClusterNode(node.host, node.port, **kwargs) for node in startup_nodes],
            require_full_coverage=True,
            connection_kwargs=kwargs,
            event_dispatcher=dispatcher,
        )


class _Sentinel(Sentinel):
    """redis-py's ``Sentinel``, with a master lookup that keeps its list of sentinels whole.

    redis-py 7.4 moves the sentinel that answered to the front of the list by the index it
    had before its await. Two lookups at once (in a failover every connection looks) then
    write one sentinel into two places and drop another: never asked again, and never
    closed by ``_SentinelMaster.aclose`` ("unclosed Connection" when it is collected, in
    about one failover in fifteen here). This moves it by identity, after the await."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        failed: list[str] = []
        for sentinel in list(self.sentinels):  # a lookup at the same time may reorder it
            try:
                masters = await sentinel.sentinel_masters()  # type: ignore[no-untyped-call]  # untyped in redis-py
            except (RedisConnectionError, RedisTimeoutError) as exc:
                failed.append(type(exc).__name__)
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                rest = [other for other in self.sentinels if other is not sentinel]
                self.sentinels[:] = [sentinel, *rest]
                return state["ip"], state["port"]
        raise MasterNotFoundError(f"no master found for {service_name!r} {failed}")


def _build_sentinel_master(url: str, options: dict[str, Any]) -> Redis:
    # redis+sentinel://[user:password@]host:port[,host:port]/service_name[/db]: the
    # credentials are the master's. Sentinels that require a password of their own
    # (`requirepass` in sentinel.conf) get ?sentinel_password=...[&sentinel_username=...];
    # rediss+sentinel:// is TLS to both, with the same timeouts.
    parsed = parse_multi_host_url(url, _SENTINEL_PORT)
    tls = _tls_options(url, parsed, {"sentinel_username", "sentinel_password"})
    parts = list(parsed.path)
    db = parts.pop() if len(parts) == 2 and parts[1].isdigit() else "0"
    if len(parts) != 1:
        raise ValueError("expected redis+sentinel://host:port[,host:port]/service_name[/db]")
    sentinel_auth = {
        "username": parsed.query.get("sentinel_username") or None,
        "password": parsed.query.get("sentinel_password") or None,
    }
    sentinel = _Sentinel(  # type: ignore[no-untyped-call]  # redis-py's sentinel is untyped
        list(parsed.nodes),
        sentinel_kwargs={**options, **tls, **sentinel_auth},
        username=parsed.username,
        password=parsed.password,
        db=int(db),
        **options,
        **tls,
    )
    master = sentinel.master_for(parts[0], redis_class=_SentinelMaster)
    return cast(Redis, master)


def _awaitable(value: Awaitable[_T] | _T) -> Awaitable[_T]:
    # redis-py types some commands `Awaitable[T] | T`, one annotation for its sync and
    # asyncio clients; on an asyncio client the result is always awaitable.
    return cast(Awaitable[_T], value)


class RedisSessionStore:
    """``SessionStore`` on Redis. It owns ``client`` and closes it in ``aclose()``."""

    def __init__(
        self,
        settings: SessionSettings,
        client: RedisClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._timeout_s = settings.redis_timeout_s
        self._wait_replicas = settings.wait_replicas
        self._wait_timeout_ms = max(int(settings.wait_timeout_s * 1000), 1)
        self._prefix = settings.key_prefix
        self._channel = channel_of(settings.key_prefix)
        # The invalidation feed comes with the local cache (local_cache_s > 0); it also
        # wakes lock waiters and session watchers (_wakeups), which poll without it.
        self._feed: InvalidationFeed | None = None
        self._cache: LocalSessionCache | None = None
        self._wakeups = Wakeups()
        if settings.local_cache_s > 0:
            subscriber = RedisSubscriber(client, self._channel)
            self._feed = InvalidationFeed(subscriber.subscribe, metrics, clock=clock)
            self._cache = LocalSessionCache(
                self._feed,
                metrics,
                max_age_s=settings.local_cache_s,
                max_entries=settings.local_cache_size,
                absolute_timeout_s=settings.absolute_timeout_s,
                clock=clock,
            )
            self._feed.add_listener(self._cache)
            self._feed.add_listener(self._wakeups)
        self._idle_ms = settings.idle_timeout_s * 1000
        self._absolute_ms = settings.absolute_timeout_s * 1000
        # redis-py annotates register_script's `self` as Redis; RedisCluster has it too,
        # and routes each call by the slot of its keys.
        scripts = cast(Redis, client)
        self._load_and_touch = scripts.register_script(_LOAD_AND_TOUCH)
        self._create = scripts.register_script(_CREATE)
        self._compare_and_set = scripts.register_script(_COMPARE_AND_SET)
        self._delete = scripts.register_script(_DELETE)
        self._index = scripts.register_script(_INDEX)
        self._release = scripts.register_script(_RELEASE)

    def _session_key(self, storage_id: str) -> str:
        return f"{self._prefix}:{{{storage_id}}}:s"

    def _lock_key(self, storage_id: str) -> str:
        return f"{self._prefix}:{{{storage_id}}}:lock"

    def _backoff_key(self, storage_id: str) -> str:
        return f"{self._prefix}:{{{storage_id}}}:backoff"

    async def _replicated(self, key: str, write: str, *command: Any) -> Any:
        """Run the write ``command`` on ``key``, then ``WAIT`` for ``session.wait_replicas``
        on the same connection (WAIT counts that connection's writes); the write's reply.

        Fewer acknowledgements within ``session.wait_timeout_s`` are counted and logged, not
        an error: the master has the write, and refusing it would cost the refresh it is part
        of. A write that was not made (a lock already taken, a lost compare-and-set) is not
        counted."""
        pipe = self._client.pipeline(transaction=False)
        pipe.execute_command(*command)
        wait = ("WAIT", self._wait_replicas, self._wait_timeout_ms)
        if isinstance(self._client, RedisCluster):
            # redis-py sends WAIT to every primary by default; it must run on the key's
            # node, in that node's pipeline (one connection), to count this write.
            node = self._client.get_node_from_key(key)
            if node is None:
                return (await pipe.execute())[0]
            pipe.execute_command(*wait, target_nodes=node)
        else:
            pipe.execute_command(*wait)
        reply, acks = await pipe.execute()
        if reply and int(acks) < self._wait_replicas:
            self._metrics.session_store_unreplicated_total.labels(write=write).inc()
            log.warning(
                "session_store_unreplicated",
                extra={"write": write, "replicas": int(acks), "wanted": self._wait_replicas},
            )
        return reply

    def _index_key(self, kind: str, value: str) -> str:
        return f"{self._prefix}:{kind}:{digest(value)}"

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @contextlib.asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        try:
            # The request's deadline (``deadline``), else this call's own: redis-py's retry
            # and a Sentinel's master lookup included, never once per attempt.
            async with asyncio.timeout_at(deadline_of_call(self._timeout_s)):
                yield
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            # The text of a Redis error can carry a host or a key: it stays out of responses.
            self._metrics.session_store_errors_total.inc()
            log.warning("session_store_error", extra={"error_type": type(exc).__name__})
            raise SessionStoreUnavailableError() from exc

    async def create(self, handle: SessionHandle, session: Session) -> Session:
        created_at = session.created_at or self._clock()
        created_ms = int(created_at * 1000)
        ttl_ms = min(self._idle_ms, created_ms + self._absolute_ms - self._now_ms())
        if ttl_ms <= 0:
            raise ValueError("the session is already past its absolute timeout")
        stored = replace(session, created_at=created_at, version=1)
        blob = seal_session(handle, stored)
        async with self._translated():
            # The session before its index entries: if Redis fails in between, the login
            # fails and the unindexed session, whose cookie nobody got, expires by its TTL.
            await self._create(
                keys=[self._session_key(handle.storage_id)], args=[blob, created_ms, ttl_ms]
            )
            index_ttl_ms = created_ms + self._absolute_ms - self._now_ms()
            await self._add_to_index("sub", stored.subject, handle.storage_id, index_ttl_ms)
            if stored.idp_session_id:
                await self._add_to_index(
                    "sid", stored.idp_session_id, handle.storage_id, index_ttl_ms
                )
        return stored

    async def _add_to_index(self, kind: str, value: str, storage_id: str, ttl_ms: int) -> None:
        index = self._index_key(kind, value)
        for member in await self._members(index):
            if not await self._client.exists(self._session_key(member)):
                await _awaitable(self._client.srem(index, member))  # prune ended sessions
        await self._index(keys=[index], args=[storage_id, max(ttl_ms, 1)])

    async def _members(self, index: str) -> list[str]:
        members = await _awaitable(self._client.smembers(index))
        return sorted(member.decode() for member in members)

    @property
    def cache(self) -> LocalSessionCache | None:
        return self._cache

    @property
    def feed(self) -> InvalidationFeed | None:
        return self._feed

    @property
    def wakeups(self) -> Wakeups:
        """Who waits on the feed's news now (``wait_for_unlock``, ``watch``)."""
        return self._wakeups

    def start(self) -> None:
        """Start following invalidations (the local cache); ``aclose`` stops it."""
        if self._feed is not None:
            self._feed.start()

    def cached(self, handle: SessionHandle) -> Session | None:
        cache = self._cache
        return None if cache is None else cache.get(handle.storage_id)

    async def load(self, handle: SessionHandle, *, cached: bool = False) -> Session | None:
        cache = self._cache
        if cache is not None and cached:
            hit = cache.get(handle.storage_id)
            if hit is not None:
                return hit
            return await cache.coalesce(handle.storage_id, lambda: self._load(handle))
        return await self._load(handle)

    async def _load(self, handle: SessionHandle) -> Session | None:
        cache = self._cache
        generation = 0 if cache is None else cache.generation
        key = self._session_key(handle.storage_id)
        with self._tracer.start_as_current_span(
            "session load", kind=SpanKind.CLIENT, attributes={"db.system.name": "redis"}
        ):
            async with self._translated():
                found = await self._load_and_touch(
                    keys=[key], args=[self._now_ms(), self._idle_ms, self._absolute_ms]
                )
        if found is None:
            return None
        version, blob = found
        session = open_session(handle, bytes(blob), int(version))
        if session is not None and cache is not None:
            cache.put(handle.storage_id, session, generation)
        return session

    async def save(self, handle: SessionHandle, session: Session) -> Session | None:
        blob = seal_session(handle, session)
        storage_id = handle.storage_id
        key = self._session_key(storage_id)
        args: list[bytes | str | int] = [
            session.version,
            blob,
            self._now_ms(),
            self._idle_ms,
            self._absolute_ms,
            self._channel,
            invalidation_message(storage_id),
        ]
        async with self._translated():
            if self._wait_replicas:
                # The rotated refresh token on a replica before the lock is released: a
                # failover then cannot bring back the spent one (EVAL: a pipeline would ask
                # SCRIPT EXISTS first; a refresh is rare enough to send the script).
                command = ("EVAL", _COMPARE_AND_SET, 1, key, *args)
                version = await self._replicated(key, "session", *command)
            else:
                version = await self._compare_and_set(keys=[key], args=args)
        if self._feed is not None:
            self._feed.invalidated_here(storage_id)  # ours at once; others by the publish
        if not version:
            return None
        return replace(session, version=int(version))

    async def delete(self, handle: SessionHandle) -> bool:
        async with self._translated():
            return bool(await self._delete_by_id(handle.storage_id))

    async def _delete_by_id(self, storage_id: str) -> int:
        keys = [
            self._session_key(storage_id),
            self._lock_key(storage_id),
            self._backoff_key(storage_id),
        ]
        if self._feed is not None:
            self._feed.invalidated_here(storage_id)
        message = invalidation_message(storage_id)
        return int(await self._delete(keys=keys, args=[self._channel, message]))

    async def delete_by_subject(self, subject: str) -> int:
        return await self._delete_indexed(self._index_key("sub", subject))

    async def delete_by_idp_session(self, idp_session_id: str) -> int:
        return await self._delete_indexed(self._index_key("sid", idp_session_id))

    async def _delete_indexed(self, index: str) -> int:
        # Per-session DELs, never one multi-key command: the sessions live in other slots.
        ended = 0
        async with self._translated():
            members = await self._members(index)
            for storage_id in members:
                ended += await self._delete_by_id(storage_id)
            if members:
                # SREM what we ended, not DEL: a login racing this logout keeps its entry.
                await _awaitable(self._client.srem(index, *members))
        return ended

    async def put_login_state(self, state: str, key: bytes, login: LoginState, ttl_s: int) -> None:
        state_id = digest(state)
        blob = seal(key, login.to_json(), slot_aad("login", state_id))
        async with self._translated():
            await self._client.set(f"{self._prefix}:login:{state_id}", blob, ex=ttl_s)

    async def take_login_state(self, state: str, key: bytes) -> LoginState | None:
        state_id = digest(state)
        async with self._translated():
            # GETDEL: one round trip, so two callbacks with one state cannot both succeed.
            blob = await self._client.getdel(f"{self._prefix}:login:{state_id}")
        if blob is None:
            return None
        plaintext = open_sealed(key, bytes(blob), slot_aad("login", state_id))
        return None if plaintext is None else LoginState.from_json(plaintext)

    async def remember_once(self, namespace: str, value: str, ttl_s: int) -> bool:
        key = f"{self._prefix}:once:{namespace}:{digest(value)}"
        async with self._translated():
            return bool(await self._client.set(key, b"1", nx=True, ex=ttl_s))

    async def acquire_lock(self, handle: SessionHandle, token: str, ttl_s: float) -> bool:
        key = self._lock_key(handle.storage_id)
        ttl_ms = max(int(ttl_s * 1000), 1)
        async with self._translated():
            if self._wait_replicas:
                # The lock on a replica before the IdP is called: a failover then cannot
                # lose it and let another replica refresh with the token we rotate.
                command = ("SET", key, token, "NX", "PX", ttl_ms)
                return bool(await self._replicated(key, "lock", *command))
            return bool(await self._client.set(key, token, nx=True, px=ttl_ms))

    async def release_lock(self, handle: SessionHandle, token: str) -> bool:
        storage_id = handle.storage_id
        async with self._translated():
            released = await self._release(
                keys=[self._lock_key(storage_id)],
                args=[token, self._channel, unlock_message(storage_id)],
            )
        return bool(released)

    async def wait_for_unlock(self, handle: SessionHandle, timeout_s: float) -> None:
        # A release is published (_RELEASE): while the invalidation feed is subscribed,
        # it wakes us, and a poll every _POLL_WITH_FEED_S only catches a lock that ran out
        # its TTL. Without the feed we poll with backoff; a key's expiry sends no message
        # without keyspace notifications. The caller's single flight keeps it to one waiter
        # per process and session.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        key = self._lock_key(handle.storage_id)
        delay_s = _POLL_FIRST_S
        while True:
            feed = self._feed
            with contextlib.ExitStack() as stack:
                released = None
                if feed is not None and feed.subscribed:
                    released = stack.enter_context(self._wakeups.lock_released(handle.storage_id))
                async with self._translated():
                    if not await self._client.exists(key):
                        return
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    return
                if released is not None:
                    await asyncio.wait({released}, timeout=min(_POLL_WITH_FEED_S, remaining_s))
                else:
                    await asyncio.sleep(min(delay_s, remaining_s))
                    delay_s = min(delay_s * 2, _POLL_MAX_S)

    async def load_backoff(self, handle: SessionHandle) -> RefreshBackoff | None:
        async with self._translated():
            raw = await self._client.get(self._backoff_key(handle.storage_id))
        if raw is None:
            return None
        attempts, _, until_ms = bytes(raw).decode("ascii", "replace").partition(":")
        if not (attempts.isdigit() and until_ms.isdigit()):
            return None  # not ours to read: as if none
        return RefreshBackoff(int(attempts), int(until_ms) / 1000)

    async def save_backoff(
        self, handle: SessionHandle, backoff: RefreshBackoff, ttl_s: float
    ) -> None:
        value = f"{backoff.attempts}:{int(backoff.until * 1000)}"
        ttl_ms = max(int(ttl_s * 1000), 1)
        async with self._translated():
            await self._client.set(self._backoff_key(handle.storage_id), value, px=ttl_ms)

    async def clear_backoff(self, handle: SessionHandle) -> None:
        async with self._translated():
            await self._client.delete(self._backoff_key(handle.storage_id))

    def deadline(self) -> AbstractContextManager[None]:
        return bounded(self._timeout_s)

    @contextmanager
    def watch(self, storage_id: str) -> Iterator[SessionWatch]:
        # Every write and end is published (_COMPARE_AND_SET, _DELETE) and reaches the
        # invalidation feed, while it is subscribed. Without it (local_cache_s 0, the feed
        # down) nothing tells: the watcher polls.
        feed = self._feed
        if feed is None or not feed.subscribed:
            yield SessionWatch(asyncio.get_running_loop().create_future(), told=False)
            return
        with self._wakeups.session_changed(storage_id) as changed:
            yield SessionWatch(changed, told=True)

    async def ping(self) -> bool:
        """True when Redis answers; False, never an exception, when it does not."""
        try:
            return bool(await _awaitable(self._client.ping()))
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        if self._feed is not None:
            await self._feed.aclose()
        if self._cache is not None:
            await self._cache.aclose()
        await self._client.aclose()

"""RFC 7662 introspection against a fake endpoint on a real socket: what is accepted, what
is refused (401) and what is unknown (503, unless a cached answer may be served stale);
the cache by digest, its TTLs and bound, the shared cache, one call per token at a time,
and the client authentication sent. The clock is moved by hand: nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import event, given
from hypothesis import strategies as st

from gateway.errors import IntrospectionUnavailableError, InvalidTokenError
from gateway.idp.discovery import Discovery
from gateway.metrics import Metrics
from gateway.settings import IntrospectionSettings, ProviderSettings
from gateway.tokens.introspection import MAX_REPLY_BYTES, Introspector, token_digest
from gateway.tokens.shared import MemoryTokenState, SharedStateUnavailable

AiohttpServer = Callable[..., Awaitable[TestServer]]

ISSUER = "https://idp.example"
AUDIENCE = "https://opaque.example.test"
NOW = 1_700_000_000.0
LEEWAY_S = 30
PROVIDER = "opaque"
CLIENT_ID = "tokengate-rs"
SECRET = "rs-secret-0123456789"
TOKEN = "opaque-token-0123456789abcdef"
_ABSENT = object()  # a member left out of a reply


def active(**overrides: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "active": True,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "client_id": "tokengate-m2m",
        "scope": "api.read",
        "iat": NOW - 10,
        "exp": NOW + 3600,
        "token_type": "Bearer",
    }
    for name, value in overrides.items():
        if value is _ABSENT:
            reply.pop(name, None)
        else:
            reply[name] = value
    return reply


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeEndpoint:
    """An introspection endpoint that counts calls and answers what it is told: ``reply``
    as JSON, or ``raw`` bytes, with ``status``; held while ``hold`` is unset. Also the
    provider's discovery document."""

    def __init__(self) -> None:
        self.url = ""
        self.calls = 0
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []  # headers, form
        self.status = 200
        self.reply: Any = active()
        self.raw: bytes | None = None
        self.hold: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"{self.url}/introspect"

    async def introspect(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        form = await request.post()
        self.requests.append((dict(request.headers), {k: str(v) for k, v in form.items()}))
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.raw is not None:
            return web.Response(body=self.raw, status=self.status, content_type="application/json")
        # json.dumps as Python writes it: NaN and Infinity too, when a test asks for them.
        return web.Response(
            text=json.dumps(self.reply), status=self.status, content_type="application/json"
        )

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.url,
                "jwks_uri": f"{self.url}/jwks",
                "introspection_endpoint": self.endpoint,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/introspect", self.introspect)
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        return app


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> AsyncIterator[FakeEndpoint]:
    endpoint = FakeEndpoint()
    server = await aiohttp_server(endpoint.app(), host="127.0.0.1")
    endpoint.url = str(server.make_url("")).rstrip("/")
    yield endpoint
    if endpoint.hold is not None:
        endpoint.hold.set()  # let a held handler finish before the server closes


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


Make = Callable[..., Introspector]


@pytest.fixture
async def make(
    fake: FakeEndpoint, http: aiohttp.ClientSession, clock: Clock, metrics: Metrics
) -> AsyncIterator[Make]:
    made: list[Introspector] = []

    def build(
        *,
        shared: Any = None,
        discovery: Discovery | None = None,
        provider: dict[str, Any] | None = None,
        **introspection: Any,
    ) -> Introspector:
        settings: dict[str, Any] = {
            "endpoint": fake.endpoint,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            **introspection,
        }
        if settings["endpoint"] is None:
            del settings["endpoint"]
        config: dict[str, Any] = {
            "name": PROVIDER,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "leeway_s": LEEWAY_S,
            "timeout_s": 2,
            "validation": "introspection",
            **(provider or {}),
            "introspection": IntrospectionSettings(**settings),
        }
        introspector = Introspector(
            ProviderSettings(**config), discovery, http, metrics, shared=shared, clock=clock
        )
        made.append(introspector)
        return introspector

    yield build
    for introspector in made:
        await introspector.aclose()


def count(metrics: Metrics, name: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        f"tokengate_{name}_total", {"provider": PROVIDER, "result": result}
    )
    return value or 0.0


async def refusal(introspector: Introspector, token: str = TOKEN) -> str:
    with pytest.raises(InvalidTokenError) as raised:
        await introspector.introspect(token)
    assert TOKEN not in raised.value.description
    return raised.value.result


async def unavailable(introspector: Introspector, token: str = TOKEN) -> None:
    with pytest.raises(IntrospectionUnavailableError) as raised:
        await introspector.introspect(token)
    assert raised.value.status == 503
    assert raised.value.headers() == {"Retry-After": "2"}


# -- the answer --------------------------------------------------------------------------


async def test_an_active_token_is_its_claims(
    make: Make, fake: FakeEndpoint, metrics: Metrics
) -> None:
    claims = await make().introspect(TOKEN)

    assert claims == active()
    headers, form = fake.requests[0]
    assert form == {"token": TOKEN, "token_type_hint": "access_token"}
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert count(metrics, "introspection", "active") == 1
    assert count(metrics, "introspection_cache", "miss") == 1
    duration = metrics.registry.get_sample_value(
        "tokengate_introspection_duration_seconds_count", {"provider": PROVIDER}
    )
    assert duration == 1


async def test_the_claims_handed_out_are_a_copy(make: Make) -> None:
    introspector = make()
    (await introspector.introspect(TOKEN))["scope"] = "admin"
    assert (await introspector.introspect(TOKEN))["scope"] == "api.read"


async def test_an_inactive_token_is_401_inactive(
    make: Make, fake: FakeEndpoint, metrics: Metrics
) -> None:
    fake.reply = {"active": False}
    introspector = make()

    with pytest.raises(InvalidTokenError) as raised:
        await introspector.introspect(TOKEN)
    assert raised.value.status == 401
    assert raised.value.result == "inactive"
    assert "invalid_token" in raised.value.headers()["WWW-Authenticate"]
    assert count(metrics, "introspection", "inactive") == 1


async def test_an_empty_token_is_refused_without_a_call(make: Make, fake: FakeEndpoint) -> None:
    assert await refusal(make(), "") == "malformed"
    assert fake.calls == 0


@pytest.mark.parametrize(
    ("overrides", "result"),
    [
        ({"exp": NOW - LEEWAY_S - 1}, "expired"),
        ({"exp": str(int(NOW + 3600))}, "malformed"),
        ({"exp": True}, "malformed"),
        ({"exp": None}, "malformed"),
        ({"exp": 10**400}, "malformed"),
        ({"nbf": NOW + LEEWAY_S + 60}, "not_yet_valid"),
        ({"nbf": "soon"}, "malformed"),
        ({"iat": NOW + LEEWAY_S + 60}, "not_yet_valid"),
        ({"iat": [1]}, "bad_iat"),
        ({"iss": "https://evil.example"}, "wrong_issuer"),
        ({"iss": 7}, "malformed"),
        ({"aud": _ABSENT}, "missing_claim"),
        ({"aud": "https://other.example"}, "wrong_audience"),
        ({"aud": ["https://other.example"]}, "wrong_audience"),
        ({"aud": [AUDIENCE, 3]}, "wrong_audience"),
        ({"scope": ["api.read"]}, "malformed"),
        ({"client_id": 42}, "malformed"),
        ({"sub": None}, "malformed"),
        ({"jti": 1}, "malformed"),
        ({"cnf": "jkt"}, "malformed"),
        ({"cnf": ["x"]}, "malformed"),
        ({"cnf": {"jkt": 5}}, "malformed"),
        ({"cnf": {"x5t#S256": None}}, "malformed"),
        ({"token_type": 1}, "malformed"),
        ({"token_type": "refresh_token"}, "wrong_type"),
    ],
)
async def test_an_active_answer_failing_a_check_is_refused(
    make: Make, fake: FakeEndpoint, metrics: Metrics, overrides: dict[str, Any], result: str
) -> None:
    fake.reply = active(**overrides)
    assert await refusal(make()) == result
    assert count(metrics, "introspection", "active") == 1  # what the endpoint said


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": _ABSENT},  # RFC 7662: every member but active is optional
        {"iss": _ABSENT},
        {"exp": NOW - LEEWAY_S + 1},  # within the leeway, as for a JWT
        {"exp": NOW + 0.5},
        {"aud": [AUDIENCE, "https://other.example"]},
        {"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}, "token_type": "DPoP"},
        {"sub": "alice", "username": "alice", "extra": {"anything": [1, None]}},
        {"nbf": NOW - 1},
    ],
)
async def test_well_formed_active_answers_are_accepted(
    make: Make, fake: FakeEndpoint, overrides: dict[str, Any]
) -> None:
    fake.reply = active(**overrides)
    assert await make().introspect(TOKEN) == fake.reply


async def test_without_an_audience_configured_aud_is_not_required(
    make: Make, fake: FakeEndpoint
) -> None:
    fake.reply = active(aud=_ABSENT)
    assert "aud" not in await make(provider={"audience": ()}).introspect(TOKEN)


@pytest.mark.parametrize(
    "reply",
    [
        {"active": "true"},
        {"active": 1},
        {"active": None},
        {"scope": "api.read"},  # no active at all
        [{"active": True}],
        "active",
        None,
    ],
)
async def test_an_answer_without_a_boolean_active_is_503(
    make: Make, fake: FakeEndpoint, metrics: Metrics, reply: Any
) -> None:
    fake.reply = reply
    await unavailable(make())
    assert count(metrics, "introspection", "error") == 1


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (500, None),
        (503, b'{"active": true}'),
        (401, b'{"error": "invalid_client"}'),
        (200, b"<html>not json</html>"),
        (200, b'{"active": true, "exp": NaN}'),  # Python's json, not JSON
        (200, b'{"active": true'),
        (200, b"\xff\xfe"),
        (200, b"[" * 100_000 + b"]" * 100_000),
        (200, b'{"active": true, "pad": "' + b"x" * MAX_REPLY_BYTES + b'"}'),
    ],
)
async def test_a_failed_or_garbled_reply_is_503(
    make: Make, fake: FakeEndpoint, metrics: Metrics, status: int, raw: bytes | None
) -> None:
    fake.status, fake.raw = status, raw
    await unavailable(make())
    assert count(metrics, "introspection", "error") == 1


async def test_a_slow_endpoint_is_503_at_the_provider_timeout(
    make: Make, fake: FakeEndpoint, metrics: Metrics
) -> None:
    fake.hold = asyncio.Event()
    await unavailable(make(provider={"timeout_s": 0.05}))
    assert count(metrics, "introspection", "error") == 1


async def test_an_unreachable_endpoint_is_503(make: Make, fake: FakeEndpoint) -> None:
    await unavailable(make(endpoint="http://127.0.0.1:9/introspect"))


async def test_the_endpoint_from_discovery(
    make: Make, fake: FakeEndpoint, http: aiohttp.ClientSession
) -> None:
    provider = {"issuer": fake.url}
    discovery = Discovery(ProviderSettings(name=PROVIDER, **provider), http)
    fake.reply = active(iss=fake.url)
    introspector = make(endpoint=None, discovery=discovery, provider=provider)
    assert (await introspector.introspect(TOKEN))["iss"] == fake.url
    assert fake.calls == 1


async def test_neither_an_endpoint_nor_discovery_is_a_programming_error(make: Make) -> None:
    with pytest.raises(ValueError, match="no introspection endpoint"):
        make(endpoint=None)


async def test_logs_never_carry_the_token_the_reply_or_the_secret(
    make: Make, fake: FakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.reply = {"active": "yes", "note": "reply-body-marker"}
    await unavailable(make(cache_ttl_s=0))
    fake.status, fake.reply = 500, {"error": "reply-body-marker"}
    await unavailable(make(cache_ttl_s=0))
    assert caplog.records
    for record in caplog.records:
        text = repr(record.__dict__)
        for secret in (TOKEN, SECRET, "reply-body-marker"):
            assert secret not in text


# -- one call per token at a time --------------------------------------------------------


async def test_concurrent_introspections_of_one_token_make_one_call(
    make: Make, fake: FakeEndpoint, metrics: Metrics
) -> None:
    fake.hold = asyncio.Event()
    introspector = make()
    tasks = [asyncio.create_task(introspector.introspect(TOKEN)) for _ in range(10)]
    await fake.arrived.wait()
    fake.hold.set()

    answers = await asyncio.gather(*tasks)

    assert answers == [active()] * 10
    assert fake.calls == 1
    assert count(metrics, "introspection", "active") == 1
    assert count(metrics, "introspection_cache", "miss") == 10


async def test_concurrent_failures_are_each_callers_own_error(
    make: Make, fake: FakeEndpoint
) -> None:
    fake.hold, fake.status = asyncio.Event(), 500
    introspector = make()
    tasks = [asyncio.create_task(introspector.introspect(TOKEN)) for _ in range(3)]
    await fake.arrived.wait()
    fake.hold.set()
    errors = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, IntrospectionUnavailableError) for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert fake.calls == 1


async def test_a_cancelled_caller_does_not_cancel_the_call(make: Make, fake: FakeEndpoint) -> None:
    fake.hold = asyncio.Event()
    introspector = make()
    first = asyncio.create_task(introspector.introspect(TOKEN))
    await fake.arrived.wait()
    second = asyncio.create_task(introspector.introspect(TOKEN))
    await asyncio.sleep(0)  # second joins the flight
    first.cancel()
    fake.hold.set()
    assert await second == active()
    assert fake.calls == 1


async def test_aclose_cancels_the_calls_under_way(make: Make, fake: FakeEndpoint) -> None:
    fake.hold = asyncio.Event()
    introspector = make()
    waiting = asyncio.create_task(introspector.introspect(TOKEN))
    await fake.arrived.wait()
    await introspector.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting


# -- the cache ---------------------------------------------------------------------------


async def test_an_active_answer_is_kept_for_cache_ttl(
    make: Make, fake: FakeEndpoint, clock: Clock, metrics: Metrics
) -> None:
    introspector = make(cache_ttl_s=60)
    await introspector.introspect(TOKEN)
    clock.now += 59.9
    await introspector.introspect(TOKEN)
    assert fake.calls == 1
    assert count(metrics, "introspection_cache", "hit") == 1
    clock.now += 0.1
    await introspector.introspect(TOKEN)
    assert fake.calls == 2


async def test_an_active_answer_is_kept_no_later_than_the_tokens_exp(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    fake.reply = active(exp=NOW + 20)
    introspector = make(cache_ttl_s=60)
    await introspector.introspect(TOKEN)
    clock.now = NOW + 19.9
    await introspector.introspect(TOKEN)
    assert fake.calls == 1
    clock.now = NOW + 20 + LEEWAY_S + 1  # asked again: the endpoint's own answer is past exp
    assert await refusal(introspector) == "expired"
    assert fake.calls == 2


async def test_the_cache_is_keyed_by_the_tokens_digest(make: Make) -> None:
    introspector = make()
    await introspector.introspect(TOKEN)
    assert list(introspector._cache) == [token_digest(TOKEN)]
    assert len(token_digest(TOKEN)) == 64


async def test_an_inactive_answer_is_kept_for_the_negative_ttl(
    make: Make, fake: FakeEndpoint, clock: Clock, metrics: Metrics
) -> None:
    fake.reply = {"active": False}
    introspector = make(cache_ttl_s=60, negative_cache_ttl_s=5)
    assert await refusal(introspector) == "inactive"
    fake.reply = active()  # the endpoint changed its mind; the cache has not yet
    clock.now += 4.9
    assert await refusal(introspector) == "inactive"
    assert (fake.calls, count(metrics, "introspection_cache", "hit")) == (1, 1)
    clock.now += 0.1
    assert await introspector.introspect(TOKEN) == active()
    assert fake.calls == 2


async def test_a_refused_active_answer_is_kept_for_the_negative_ttl(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    fake.reply = active(aud="https://other.example")
    introspector = make(negative_cache_ttl_s=5)
    assert await refusal(introspector) == "wrong_audience"
    assert await refusal(introspector) == "wrong_audience"
    assert fake.calls == 1
    clock.now += 5
    assert await refusal(introspector) == "wrong_audience"
    assert fake.calls == 2


async def test_a_zero_negative_ttl_keeps_no_inactive_answer(make: Make, fake: FakeEndpoint) -> None:
    fake.reply = {"active": False}
    introspector = make(negative_cache_ttl_s=0)
    for _ in range(2):
        assert await refusal(introspector) == "inactive"
    assert fake.calls == 2


@pytest.mark.parametrize("off", [{"cache_ttl_s": 0}, {"cache_size": 0}])
async def test_a_zero_ttl_or_size_turns_the_cache_off(
    make: Make, fake: FakeEndpoint, off: dict[str, Any]
) -> None:
    introspector = make(**off)
    for _ in range(3):
        await introspector.introspect(TOKEN)
    assert fake.calls == 3
    assert introspector.cached_answers == 0


async def test_the_cache_keeps_the_most_recently_used_answers(
    make: Make, fake: FakeEndpoint
) -> None:
    introspector = make(cache_size=2)
    await introspector.introspect("token-a")
    await introspector.introspect("token-b")
    await introspector.introspect("token-a")  # a hit: a is now the most recent
    await introspector.introspect("token-c")  # b out
    assert (fake.calls, introspector.cached_answers) == (3, 2)
    await introspector.introspect("token-a")
    await introspector.introspect("token-c")
    assert fake.calls == 3
    await introspector.introspect("token-b")
    assert fake.calls == 4


# -- the endpoint unavailable ------------------------------------------------------------


async def test_no_stale_answer_without_stale_if_error(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    introspector = make(cache_ttl_s=60)
    await introspector.introspect(TOKEN)
    fake.status = 500
    clock.now += 60
    await unavailable(introspector)


async def test_stale_if_error_serves_a_cached_active_answer_then_expires(
    make: Make, fake: FakeEndpoint, clock: Clock, metrics: Metrics
) -> None:
    introspector = make(cache_ttl_s=60, stale_if_error_s=30)
    await introspector.introspect(TOKEN)
    fake.status = 500
    clock.now = NOW + 70
    assert await introspector.introspect(TOKEN) == active()
    assert count(metrics, "introspection_cache", "stale") == 1
    assert count(metrics, "introspection", "error") == 1
    clock.now = NOW + 89.9
    assert await introspector.introspect(TOKEN) == active()
    clock.now = NOW + 90
    await unavailable(introspector)
    assert fake.calls == 4  # every stale answer asked the endpoint first


async def test_stale_if_error_never_serves_past_the_tokens_exp(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    fake.reply = active(exp=NOW + 75)
    introspector = make(cache_ttl_s=60, stale_if_error_s=300)
    await introspector.introspect(TOKEN)
    fake.status = 500
    clock.now = NOW + 74
    assert await introspector.introspect(TOKEN) == fake.reply
    clock.now = NOW + 75
    await unavailable(introspector)


async def test_stale_if_error_serves_no_inactive_answer(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    fake.reply = {"active": False}
    introspector = make(negative_cache_ttl_s=5, stale_if_error_s=300)
    await refusal(introspector)
    fake.status = 500
    clock.now += 5
    await unavailable(introspector)


async def test_a_fresh_answer_replaces_a_stale_one(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    introspector = make(cache_ttl_s=60, stale_if_error_s=300)
    await introspector.introspect(TOKEN)
    fake.reply = {"active": False}  # revoked meanwhile
    clock.now += 61
    assert await refusal(introspector) == "inactive"
    fake.status = 500
    clock.now += 10
    await unavailable(introspector)  # the active answer is gone, not served stale


async def test_an_inactive_answer_not_kept_still_ends_the_stale_active_one(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    introspector = make(cache_ttl_s=60, negative_cache_ttl_s=0, stale_if_error_s=300)
    await introspector.introspect(TOKEN)
    fake.reply = {"active": False}
    clock.now += 61
    assert await refusal(introspector) == "inactive"
    assert introspector.cached_answers == 0
    fake.status = 500
    await unavailable(introspector)


async def test_a_shared_answer_ends_the_stale_one(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    state = MemoryTokenState(clock=clock)
    first = make(shared=state, cache_ttl_s=60, stale_if_error_s=300)
    await first.introspect(TOKEN)
    clock.now += 61  # first's own answer and the shared one past their TTL
    fake.reply = {"active": False}
    assert await refusal(make(shared=state)) == "inactive"  # shared: inactive
    assert await refusal(first) == "inactive"  # from the shared cache
    fake.status = 500
    clock.now += 5
    await unavailable(first)


# -- the shared cache --------------------------------------------------------------------


async def test_a_second_introspector_takes_the_shared_answer(
    make: Make, fake: FakeEndpoint, clock: Clock, metrics: Metrics
) -> None:
    state = MemoryTokenState(clock=clock)
    first, second = make(shared=state), make(shared=state)
    assert await first.introspect(TOKEN) == active()
    assert await second.introspect(TOKEN) == active()
    assert fake.calls == 1
    assert count(metrics, "introspection_cache", "shared") == 1
    # Kept under the digest in the provider's namespace, the claims as compact JSON.
    value = await state.get(f"introspect:{PROVIDER}", token_digest(TOKEN))
    assert value is not None
    assert json.loads(value) == active()
    assert b" " not in value.replace(b"api.read", b"")
    assert TOKEN.encode() not in value


async def test_a_shared_answer_lives_as_long_as_the_first(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    state = MemoryTokenState(clock=clock)
    first, second = make(shared=state, cache_ttl_s=60), make(shared=state, cache_ttl_s=60)
    await first.introspect(TOKEN)
    clock.now += 59
    await second.introspect(TOKEN)
    assert fake.calls == 1
    clock.now += 1
    await second.introspect(TOKEN)
    assert fake.calls == 2  # not copied into second's own cache for another 60 s


async def test_an_inactive_answer_is_shared_for_the_negative_ttl(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    state = MemoryTokenState(clock=clock)
    fake.reply = {"active": False}
    first, second = make(shared=state), make(shared=state)
    assert await refusal(first) == "inactive"
    assert await refusal(second) == "inactive"
    assert await state.get(f"introspect:{PROVIDER}", token_digest(TOKEN)) == b"inactive"
    assert fake.calls == 1
    clock.now += 5
    fake.reply = active()
    assert await second.introspect(TOKEN) == active()
    assert fake.calls == 2


async def test_a_shared_answer_is_checked_again(
    make: Make, fake: FakeEndpoint, clock: Clock
) -> None:
    state = MemoryTokenState(clock=clock)
    key = token_digest(TOKEN)
    await state.put(f"introspect:{PROVIDER}", key, json.dumps(active(exp=NOW - 3600)).encode(), 60)
    assert await refusal(make(shared=state)) == "expired"
    await state.put(f"introspect:{PROVIDER}", key, b"not json", 60)
    assert await make(shared=state).introspect(TOKEN) == active()  # unusable: asked
    assert fake.calls == 1


class BrokenState:
    """A TokenState whose Redis never answers."""

    def __init__(self) -> None:
        self.attempts = 0

    async def remember_once(self, namespace: str, key: str, ttl_s: float) -> bool:
        raise SharedStateUnavailable("ConnectionError")

    async def get(self, namespace: str, key: str) -> bytes | None:
        self.attempts += 1
        raise SharedStateUnavailable("ConnectionError")

    async def put(self, namespace: str, key: str, value: bytes, ttl_s: float) -> None:
        self.attempts += 1
        raise SharedStateUnavailable("TimeoutError")

    async def aclose(self) -> None:
        return None


async def test_an_unavailable_shared_cache_is_skipped(
    make: Make, fake: FakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    state = BrokenState()
    introspector = make(shared=state)
    assert await introspector.introspect(TOKEN) == active()
    assert fake.calls == 1
    assert state.attempts == 2  # get, then put
    warnings = [
        r for r in caplog.records if r.getMessage() == "introspection_shared_cache_unavailable"
    ]
    assert [r.op for r in warnings] == ["get", "put"]  # type: ignore[attr-defined]
    assert await introspector.introspect(TOKEN) == active()  # the local cache still works
    assert fake.calls == 1


async def test_no_shared_cache_with_a_zero_ttl(make: Make, fake: FakeEndpoint) -> None:
    state = BrokenState()
    await make(shared=state, cache_ttl_s=0).introspect(TOKEN)
    assert state.attempts == 0


# -- client authentication ---------------------------------------------------------------


async def test_client_secret_basic(make: Make, fake: FakeEndpoint) -> None:
    await make(client_auth="client_secret_basic", client_secret="s:e/c r%t").introspect(TOKEN)
    headers, form = fake.requests[0]
    scheme, _, encoded = headers["Authorization"].partition(" ")
    client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
    assert (scheme, unquote(client_id), unquote(secret)) == ("Basic", CLIENT_ID, "s:e/c r%t")
    assert "client_id" not in form
    assert "client_secret" not in form


async def test_client_secret_post(make: Make, fake: FakeEndpoint) -> None:
    await make(client_auth="client_secret_post").introspect(TOKEN)
    headers, form = fake.requests[0]
    assert "Authorization" not in headers
    assert form == {
        "token": TOKEN,
        "token_type_hint": "access_token",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
    }


async def test_private_key_jwt(make: Make, fake: FakeEndpoint) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    introspector = make(
        client_auth="private_key_jwt",
        client_secret=None,
        private_key=pem,
        private_key_alg="ES256",
        private_key_id="rs-key",
    )
    await introspector.introspect(TOKEN)
    headers, form = fake.requests[0]
    assert "Authorization" not in headers
    assert form["client_id"] == CLIENT_ID
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = form["client_assertion"]
    assert jwt.get_unverified_header(assertion)["kid"] == "rs-key"
    claims = jwt.decode(assertion, key.public_key(), algorithms=["ES256"], audience=fake.endpoint)
    assert claims["iss"] == claims["sub"] == CLIENT_ID


# -- any reply ---------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**1100), max_value=2**1100)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
# Around the edge of expiry (NOW - LEEWAY_S), mostly after it.
TIMES = st.integers(min_value=int(NOW) - 100, max_value=int(NOW) + 400) | st.floats(
    min_value=NOW - 100, max_value=NOW + 400
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn as often as its weight says."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda strategy: strategy
    )


def member(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Absent, a value of the member's own kind (mostly), or any JSON."""
    return weighted((2, st.just(_ABSENT)), (8, values), (1, JSON_VALUES))


# Mostly well-typed members, each often wrong: about a fifth of the replies are accepted.
REPLIES = st.fixed_dictionaries(
    {
        "active": weighted(
            (1, st.just(_ABSENT)), (10, st.just(True) | st.booleans()), (1, JSON_VALUES)
        ),
        "exp": member(TIMES),
        "aud": st.one_of(
            st.just(AUDIENCE),
            st.just([AUDIENCE]),
            member(
                st.sampled_from([AUDIENCE, "https://other.example"])
                | st.lists(st.sampled_from([AUDIENCE, "x"]), max_size=2)
            ),
        ),
        "iss": member(st.sampled_from([ISSUER, ISSUER, ISSUER + "/", "https://evil.example"])),
        "scope": member(st.text(max_size=8)),
        "client_id": member(st.text(max_size=8)),
        "sub": member(st.text(max_size=8)),
        "cnf": member(
            st.fixed_dictionaries({}, optional={"jkt": st.text(max_size=8) | JSON_VALUES})
        ),
    }
).map(lambda reply: {k: v for k, v in reply.items() if v is not _ABSENT})


def number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (a bool is no number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def expected(reply: Any) -> str:
    """accepted, invalid or unavailable: RFC 7662 with a JWT's claim types, written out."""
    if not isinstance(reply, dict) or not isinstance(reply.get("active"), bool):
        return "unavailable"
    if reply["active"] is not True:
        return "invalid"
    if "exp" in reply:
        exp = number(reply["exp"])
        if exp is None or exp <= NOW - LEEWAY_S:
            return "invalid"
    if "iss" in reply and reply["iss"] != ISSUER:
        return "invalid"
    aud = reply.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        return "invalid"
    if AUDIENCE not in audiences:
        return "invalid"
    for name in ("scope", "client_id", "sub"):
        if name in reply and not isinstance(reply[name], str):
            return "invalid"
    if "cnf" in reply:
        cnf = reply["cnf"]
        if not isinstance(cnf, dict) or ("jkt" in cnf and not isinstance(cnf["jkt"], str)):
            return "invalid"
    return "accepted"


@given(reply=weighted((4, REPLIES), (1, JSON_VALUES)))
async def test_any_reply_is_accepted_only_when_active_and_its_checks_hold(
    make: Make, fake: FakeEndpoint, reply: Any
) -> None:
    fake.reply = reply
    introspector = make(cache_ttl_s=0)
    try:
        claims = await introspector.introspect(TOKEN)
    except InvalidTokenError:
        outcome = "invalid"
    except IntrospectionUnavailableError:
        outcome = "unavailable"
    else:
        assert claims == reply
        outcome = "accepted"
    event(outcome)
    assert outcome == expected(reply)

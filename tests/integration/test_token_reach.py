"""Every access token through the gateway, against the real OpenID Provider and a real
redis-server: a DPoP-bound JWT obtained with a real proof at the IdP's token endpoint (its
proof replayed on a second replica is refused), an opaque token introspected once however
many requests carry it (its revocation at the IdP seen once its answer expires), and a
second JWT issuer (standing for a Kubernetes service-account issuer) on the same route.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.app import build_app
from gateway.settings import parse_settings
from tests.fakes.issuer import FakeIssuer
from tests.fakes.upstream import FakeUpstream
from tests.support.dpop import DpopKey, make_proof
from tests.support.idp import (
    CLIENT_SECRET,
    DEFAULT_OPAQUE_RESOURCE,
    DEFAULT_RESOURCE,
    OidcProviderProcess,
    default_idp_config,
)
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration

PUBLIC_URL = "http://localhost:8080"
CACHE_TTL_S = 30


@pytest.fixture(scope="module")
def machine_idp() -> Iterator[OidcProviderProcess]:
    proc = OidcProviderProcess(default_idp_config(access_token_ttl=300, machine_clients=True))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Env:
    idp: OidcProviderProcess
    http: aiohttp.ClientSession
    token_endpoint: str
    revocation_endpoint: str
    upstream: FakeUpstream
    replicas: list[TestClient[Any, Any]]
    now: list[float]

    async def grant(self, resource: str, key: DpopKey | None = None) -> dict[str, Any]:
        """A client_credentials token of ``tokengate-m2m``, DPoP-bound to ``key`` if given."""
        headers = basic("tokengate-m2m")
        if key is not None:
            headers["DPoP"] = make_proof(
                key, method="POST", url=self.token_endpoint, access_token=None
            )
        form = {"grant_type": "client_credentials", "scope": "api.read", "resource": resource}
        async with self.http.post(self.token_endpoint, data=form, headers=headers) as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == 200, body
        return body


def basic(client_id: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(quote(client_id), quote(CLIENT_SECRET))}


@pytest.fixture
async def env(
    request: pytest.FixtureRequest,
    machine_idp: OidcProviderProcess,
    redis_server: RedisServerProcess,
    issuer: FakeIssuer,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
) -> AsyncIterator[Env]:
    upstream = FakeUpstream()
    upstream_server = await aiohttp_server(upstream.web_app(), host="127.0.0.1")
    config = {
        "public_url": PUBLIC_URL,
        "providers": [
            {
                "name": "idp",
                "issuer": machine_idp.issuer,
                "audience": [DEFAULT_RESOURCE, DEFAULT_OPAQUE_RESOURCE],
                "introspection": {
                    "client_id": "tokengate-rs",
                    "client_secret": CLIENT_SECRET,
                    "cache_ttl_s": CACHE_TTL_S,
                    "negative_cache_ttl_s": 2,
                    # indirect=True: answers in Redis for every replica too
                    "shared_cache": getattr(request, "param", False),
                },
            },
            # The service-account issuer of a cluster: RS256 JWTs, its own keys.
            {"name": "cluster", "issuer": issuer.url, "audience": "tokengate"},
        ],
        "dpop": {"replay_store": "redis"},
        "session": {"redis_url": redis_server.url, "key_prefix": f"reach{time.monotonic_ns()}"},
        "routes": [{"prefix": "/api", "upstream": str(upstream_server.make_url("")).rstrip("/")}],
    }
    settings = parse_settings(config)
    now = [time.time()]
    replicas = [await aiohttp_client(build_app(settings, clock=lambda: now[0])) for _ in range(2)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        await machine_idp.reset(http)
        async with http.get(machine_idp.discovery_url) as resp:
            meta = await resp.json()
        yield Env(
            machine_idp,
            http,
            meta["token_endpoint"],
            meta["revocation_endpoint"],
            upstream,
            replicas,
            now,
        )


def dpop_request(token: str, key: DpopKey, path: str) -> dict[str, str]:
    proof = make_proof(key, method="GET", url=f"{PUBLIC_URL}{path}", access_token=token)
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


async def test_a_dpop_bound_jwt_passes_with_its_proof_once_on_any_replica(env: Env) -> None:
    key = DpopKey.generate("ES256")
    reply = await env.grant(DEFAULT_RESOURCE, key)
    token = reply["access_token"]
    assert reply["token_type"] == "DPoP"
    first, second = env.replicas
    headers = dpop_request(token, key, "/api/orders")
    resp = await first.get("/api/orders", headers=headers)
    assert resp.status == 200, await resp.text()
    assert env.upstream.seen[-1].headers["Authorization"] == f"DPoP {token}"
    # The same proof at another replica: seen already (the replay cache is Redis).
    resp = await second.get("/api/orders", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_dpop_proof"
    # A fresh proof passes there; the token as Bearer passes nowhere (no downgrade).
    assert (
        await second.get("/api/orders", headers=dpop_request(token, key, "/api/orders"))
    ).status == 200
    resp = await second.get("/api/orders", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 401
    # And another key's proof for the token is refused: the token is bound to ``key``.
    thief = DpopKey.generate("ES256")
    resp = await first.get("/api/orders", headers=dpop_request(token, thief, "/api/orders"))
    assert resp.status == 401
    assert len(env.upstream.seen) == 2


async def test_an_opaque_token_is_introspected_once_and_its_revocation_is_seen(env: Env) -> None:
    token = (await env.grant(DEFAULT_OPAQUE_RESOURCE))["access_token"]
    assert token.count(".") != 2  # opaque
    replica = env.replicas[0]
    headers = {"Authorization": f"Bearer {token}"}
    answers = await asyncio.gather(*(replica.get("/api/x", headers=headers) for _ in range(10)))
    assert [r.status for r in answers] == [200] * 10
    assert (await env.idp.stats(env.http))["introspections"] == 1
    seen = env.upstream.seen[-1].headers
    assert seen["Authorization"] == f"Bearer {token}"
    # Revoked at the IdP by its client: the kept answer stands until its TTL, then the
    # token is refused, and the refusal is kept (one more call, not one per request).
    async with env.http.post(
        env.revocation_endpoint, data={"token": token}, headers=basic("tokengate-m2m")
    ) as resp:
        assert resp.status == 200
    assert (await replica.get("/api/x", headers=headers)).status == 200
    env.now[0] += CACHE_TTL_S + 1
    for _ in range(3):
        resp = await replica.get("/api/x", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_token"
    assert (await env.idp.stats(env.http))["introspections"] == 2


async def test_a_dpop_bound_opaque_token_is_bound_by_its_introspection_answer(env: Env) -> None:
    key = DpopKey.generate("EdDSA")
    token = (await env.grant(DEFAULT_OPAQUE_RESOURCE, key))["access_token"]
    replica = env.replicas[1]
    resp = await replica.get("/api/a", headers=dpop_request(token, key, "/api/a"))
    assert resp.status == 200, await resp.text()
    resp = await replica.get("/api/a", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 401


async def test_a_users_token_and_a_services_token_on_one_route(
    env: Env, issuer: FakeIssuer
) -> None:
    machine = (await env.grant(DEFAULT_RESOURCE))["access_token"]
    service = issuer.mint(aud="tokengate", sub="system:serviceaccount:shop:billing")
    replica = env.replicas[0]
    for token in (machine, service):
        resp = await replica.get("/api/x", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, await resp.text()
    # The cluster's issuer with the IdP's audience is not the IdP's token.
    wrong = issuer.mint(aud=DEFAULT_RESOURCE)
    resp = await replica.get("/api/x", headers={"Authorization": f"Bearer {wrong}"})
    assert resp.status == 401


@pytest.mark.parametrize("env", [True], indirect=True)
async def test_a_shared_introspection_answer_serves_every_replica(env: Env) -> None:
    token = (await env.grant(DEFAULT_OPAQUE_RESOURCE))["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    for replica in env.replicas:
        for _ in range(3):
            assert (await replica.get("/api/x", headers=headers)).status == 200
    assert (await env.idp.stats(env.http))["introspections"] == 1
    # An unknown token is asked about once by the first replica; its refusal is shared.
    forged = "not-a-token-the-idp-issued"
    for replica in env.replicas:
        resp = await replica.get("/api/x", headers={"Authorization": f"Bearer {forged}"})
        assert resp.status == 401
    assert (await env.idp.stats(env.http))["introspections"] == 2

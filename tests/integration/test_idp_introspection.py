"""Introspection against the real OpenID Provider (tests/idp/server.js with machine
clients): a machine's opaque access token (client_credentials) introspected by tokengate's
``Introspector`` as the resource server ``tokengate-rs``, revoked by its client, bound to
a DPoP key; one call at the IdP for many concurrent introspections of one token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest

from gateway.errors import IntrospectionUnavailableError, InvalidTokenError
from gateway.idp.discovery import Discovery
from gateway.metrics import Metrics
from gateway.settings import IntrospectionSettings, ProviderSettings
from gateway.tokens.introspection import Introspector
from tests.support.dpop import DpopKey, make_proof
from tests.support.idp import (
    CLIENT_SECRET,
    DEFAULT_OPAQUE_RESOURCE,
    DEFAULT_RESOURCE,
    OidcProviderProcess,
    default_idp_config,
)

pytestmark = pytest.mark.integration

ACCESS_TOKEN_TTL = 60


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProviderProcess]:
    config = default_idp_config(access_token_ttl=ACCESS_TOKEN_TTL, machine_clients=True)
    proc = OidcProviderProcess(config).start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Machines:
    """The IdP's discovery document (with its JWKS), a client session, and tokengate's
    introspectors of the opaque resource, closed by the fixture."""

    idp: OidcProviderProcess
    http: aiohttp.ClientSession
    meta: dict[str, Any]
    made: list[Introspector] = field(default_factory=list)
    dpop: DpopKey = field(default_factory=DpopKey.generate)

    def introspector(self, client_id: str = "tokengate-rs", **cache: Any) -> Introspector:
        """tokengate's view of the opaque resource: the endpoint found by discovery."""
        provider = ProviderSettings(
            name="opaque",
            issuer=self.idp.issuer,
            audience=DEFAULT_OPAQUE_RESOURCE,
            validation="introspection",
            introspection=IntrospectionSettings(
                client_id=client_id, client_secret=CLIENT_SECRET, **cache
            ),
        )
        self.made.append(
            Introspector(provider, Discovery(provider, self.http), self.http, Metrics())
        )
        return self.made[-1]

    async def grant(
        self, resource: str | None = DEFAULT_OPAQUE_RESOURCE, *, dpop: bool = False
    ) -> dict[str, Any]:
        """A client_credentials grant for ``tokengate-m2m`` (RFC 6749 §4.4), with a DPoP
        proof (RFC 9449 §5) by ``self.dpop`` when asked."""
        form = {"grant_type": "client_credentials", "scope": "api.read"}
        if resource is not None:
            form["resource"] = resource
        headers = basic("tokengate-m2m")
        if dpop:
            headers["DPoP"] = make_proof(
                self.dpop, method="POST", url=self.meta["token_endpoint"], access_token=None
            )
        async with self.http.post(self.meta["token_endpoint"], data=form, headers=headers) as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == 200, body
        return body

    async def token(self, resource: str | None = DEFAULT_OPAQUE_RESOURCE) -> str:
        return str((await self.grant(resource))["access_token"])

    async def stats(self) -> dict[str, Any]:
        return await self.idp.stats(self.http)


@pytest.fixture
async def machines(idp: OidcProviderProcess) -> AsyncIterator[Machines]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        await idp.reset(http)
        async with http.get(idp.discovery_url) as resp:
            assert resp.status == 200
            meta: dict[str, Any] = await resp.json()
        async with http.get(meta["jwks_uri"]) as resp:
            meta["jwks"] = await resp.json()
        env = Machines(idp, http, meta)
        yield env
        for introspector in env.made:
            await introspector.aclose()


def basic(client_id: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(quote(client_id), quote(CLIENT_SECRET))}


# -- tests -------------------------------------------------------------------------------


async def test_a_machines_opaque_token_is_active_for_the_resource_server(
    machines: Machines,
) -> None:
    tokens = await machines.grant()
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "api.read"
    assert tokens["access_token"].count(".") == 0  # opaque, not a JWT

    claims = await machines.introspector().introspect(tokens["access_token"])

    assert claims["active"] is True
    assert claims["aud"] == DEFAULT_OPAQUE_RESOURCE
    assert claims["scope"] == "api.read"
    assert claims["client_id"] == "tokengate-m2m"
    assert claims["iss"] == machines.idp.issuer
    assert claims["token_type"] == "Bearer"
    assert 0 < claims["exp"] - time.time() <= ACCESS_TOKEN_TTL
    assert "cnf" not in claims
    assert "sub" not in claims  # a machine's token: no user
    stats = await machines.stats()
    assert (stats["grants"], stats["introspections"]) == ({"client_credentials": 1}, 1)


async def test_a_revoked_opaque_token_is_inactive(machines: Machines) -> None:
    token = await machines.token()
    uncached = machines.introspector(cache_ttl_s=0)
    cached = machines.introspector(cache_ttl_s=60)
    assert (await uncached.introspect(token))["active"] is True
    assert (await cached.introspect(token))["active"] is True

    # RFC 7009, by the token's own client.
    form = {"token": token, "token_type_hint": "access_token"}
    async with machines.http.post(
        machines.meta["revocation_endpoint"], data=form, headers=basic("tokengate-m2m")
    ) as resp:
        assert resp.status == 200, await resp.text()

    with pytest.raises(InvalidTokenError) as raised:
        await uncached.introspect(token)
    assert raised.value.result == "inactive"
    # A cached active answer outlives the revocation, up to cache_ttl_s: the trade-off the
    # cache makes, and why its TTL is short.
    assert (await cached.introspect(token))["active"] is True
    stats = await machines.stats()
    assert (stats["revocations"], stats["introspections"]) == (1, 3)


async def test_ten_concurrent_introspections_of_one_token_are_one_call_at_the_idp(
    machines: Machines,
) -> None:
    token = await machines.token()
    check = machines.introspector()

    answers = await asyncio.gather(*(check.introspect(token) for _ in range(10)))

    assert all(a["client_id"] == "tokengate-m2m" for a in answers)
    assert (await machines.stats())["introspections"] == 1
    await check.introspect(token)  # and the cache answers the next
    assert (await machines.stats())["introspections"] == 1


async def test_a_client_not_listed_as_introspector_learns_nothing(machines: Machines) -> None:
    token = await machines.token()
    stranger = machines.introspector(client_id="tokengate")
    with pytest.raises(InvalidTokenError) as raised:
        await stranger.introspect(token)
    assert raised.value.result == "inactive"


async def test_a_dpop_proof_binds_the_machines_tokens_to_its_key(machines: Machines) -> None:
    thumbprint = machines.dpop.thumbprint

    opaque = await machines.grant(dpop=True)
    assert opaque["token_type"] == "DPoP"
    claims = await machines.introspector().introspect(opaque["access_token"])
    assert claims["cnf"] == {"jkt": thumbprint}
    assert claims["token_type"] == "DPoP"

    # No resource named: the JWT resource, the binding in the token itself.
    signed = await machines.grant(None, dpop=True)
    assert signed["token_type"] == "DPoP"
    kid = jwt.get_unverified_header(signed["access_token"])["kid"]
    access = jwt.decode(
        signed["access_token"],
        jwt.PyJWKSet.from_dict(machines.meta["jwks"])[kid],
        algorithms=["RS256"],
        audience=DEFAULT_RESOURCE,
        issuer=machines.idp.issuer,
    )
    assert access["cnf"] == {"jkt": thumbprint}
    assert access["client_id"] == "tokengate-m2m"
    assert access["scope"] == "api.read"


async def test_the_idp_refuses_to_introspect_a_jwt_which_fails_closed(machines: Machines) -> None:
    # oidc-provider answers 400 unsupported_token_type for a structured token: a provider
    # set to introspect JWTs (introspect_jwts) meets this as 503, never as a valid token.
    token = await machines.token(None)
    with pytest.raises(IntrospectionUnavailableError):
        await machines.introspector().introspect(token)

"""Several trusted providers through the gateway: each token is judged by the provider its
``iss`` names, with that provider's keys only, on the routes that take that provider; and
DPoP at ingress (the proof's own checks are test_dpop.py's)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.app import METRICS, PROVIDERS, build_app
from gateway.settings import ConfigError, dump_settings, parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import AUDIENCE, FakeIssuer, SigningKey, _private_key
from tests.fakes.upstream import FakeUpstream
from tests.support.dpop import DpopKey, dpop_key, make_proof
from tests.support.redis_topologies import make_tls_files

PUBLIC_URL = "http://localhost:8080"


@pytest.fixture
async def cluster(aiohttp_server: AiohttpServer) -> FakeIssuer:
    """A second issuer (a Kubernetes service-account issuer, say) with keys of its own,
    under the same kids as the first issuer's."""
    fake = FakeIssuer(keys=[])
    fake.keys.clear()
    fake.keys.append(SigningKey("rs256-default", "RS256", _private_key("RS256")))
    server = await aiohttp_server(fake.web_app(), host="127.0.0.1")
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


def two_provider_config(
    issuer: FakeIssuer, cluster: FakeIssuer, upstream_url: str
) -> dict[str, Any]:
    config = base_config(issuer.url, upstream_url)
    config["providers"] = [
        {"name": "cluster", "issuer": cluster.url, "audience": "tokengate", "algorithms": ["RS256"]}
    ]
    config["routes"] = [
        {"prefix": "/api", "upstream": upstream_url},
        {"prefix": "/users", "upstream": upstream_url, "providers": ["oidc"]},
        {"prefix": "/svc", "upstream": upstream_url, "providers": ["cluster"]},
        {"prefix": "/bound", "upstream": upstream_url, "providers": ["oidc"], "require_dpop": True},
    ]
    return config


@pytest.fixture
async def gateway2(
    aiohttp_client: AiohttpClient,
    issuer: FakeIssuer,
    cluster: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> TestClient[Any, Any]:
    settings = parse_settings(two_provider_config(issuer, cluster, upstream[1]))
    client = await aiohttp_client(build_app(settings))
    # Both key sets loaded: what follows counts only the fetches a token causes.
    for name in ("oidc", "cluster"):
        jwks = client.app[PROVIDERS][name].jwks
        assert jwks is not None
        await jwks.refresh()
    return client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def service_token(cluster: FakeIssuer, **claims: Any) -> str:
    return cluster.mint(aud="tokengate", sub="system:serviceaccount:shop:billing", **claims)


async def test_each_providers_token_reaches_a_route_that_takes_all(
    gateway2: TestClient[Any, Any],
    issuer: FakeIssuer,
    cluster: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    user = issuer.mint()
    service = service_token(cluster)
    assert (await gateway2.get("/api/a", headers=bearer(user))).status == 200
    assert (await gateway2.get("/api/b", headers=bearer(service))).status == 200
    assert [r.headers["Authorization"] for r in upstream[0].seen[-2:]] == [
        f"Bearer {user}",
        f"Bearer {service}",
    ]
    metrics = gateway2.app[METRICS].registry
    for provider in ("oidc", "cluster"):
        labels = {"provider": provider, "result": "valid"}
        assert metrics.get_sample_value("tokengate_token_validations_total", labels) == 1


async def test_a_route_takes_only_the_providers_it_names(
    gateway2: TestClient[Any, Any],
    issuer: FakeIssuer,
    cluster: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    seen = len(upstream[0].seen)
    fetches = (issuer.jwks_fetches, cluster.jwks_fetches)
    resp = await gateway2.get("/users/x", headers=bearer(service_token(cluster)))
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_token"
    resp = await gateway2.get("/svc/x", headers=bearer(issuer.mint()))
    assert resp.status == 401
    assert len(upstream[0].seen) == seen
    assert (issuer.jwks_fetches, cluster.jwks_fetches) == fetches  # no key was looked up
    assert (await gateway2.get("/svc/x", headers=bearer(service_token(cluster)))).status == 200


async def test_an_issuer_no_provider_has_costs_no_network_call(
    gateway2: TestClient[Any, Any], issuer: FakeIssuer, cluster: FakeIssuer
) -> None:
    fetches = (issuer.jwks_fetches, cluster.jwks_fetches)
    for route in ("/api/x", "/users/x", "/svc/x"):
        stranger = issuer.mint(iss="https://stranger.example")
        resp = await gateway2.get(route, headers=bearer(stranger))
        assert resp.status == 401
        assert "issuer" in (await resp.json())["error_description"]
    assert (issuer.jwks_fetches, cluster.jwks_fetches) == fetches
    labels = {"provider": "-", "result": "wrong_issuer"}
    assert (
        gateway2.app[METRICS].registry.get_sample_value("tokengate_token_validations_total", labels)
        == 1
    )  # /api picks by iss; /users and /svc have one provider, whose validator refuses


async def test_a_token_of_one_provider_signed_with_anothers_key_is_refused(
    gateway2: TestClient[Any, Any],
    issuer: FakeIssuer,
    cluster: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    seen = len(upstream[0].seen)
    # iss names the cluster; the signature is the user issuer's key, under the same kid.
    forged = issuer.mint(iss=cluster.url, aud="tokengate")
    cross = issuer.mint(key=issuer.key("RS256"), iss=cluster.url, aud=AUDIENCE)
    for token in (forged, cross):
        for route in ("/api/x", "/svc/x"):
            resp = await gateway2.get(route, headers=bearer(token))
            assert resp.status == 401, route
            assert "signature" in (await resp.json())["error_description"]
    # And the other way round: a user token signed with the cluster's key.
    resp = await gateway2.get("/api/x", headers=bearer(cluster.mint(iss=issuer.url)))
    assert resp.status == 401
    assert len(upstream[0].seen) == seen


def test_providers_need_distinct_names_and_issuers_and_known_names() -> None:
    upstream = "http://127.0.0.1:9"
    base = base_config("https://idp.example", upstream)
    other = {"name": "cluster", "issuer": "https://k8s.example", "audience": "x"}
    cases = {
        "is used twice": [other, {**other, "issuer": "https://k8s2.example"}],
        "trusted twice": [{**other, "issuer": "https://idp.example"}],
        "issuer: required": [{"name": "cluster", "jwks_uri": "https://k8s.example/jwks"}],
        "audience: required": [{"name": "cluster", "issuer": "https://k8s.example"}],
    }
    for message, providers in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_settings({**base, "providers": providers})
    routes = [{"prefix": "/api", "upstream": upstream, "providers": ["nobody"]}]
    with pytest.raises(ConfigError, match="no provider named 'nobody'"):
        parse_settings({**base, "providers": [other], "routes": routes})
    introspecting = {
        "validation": "introspection",
        "introspection": {"client_id": "rs", "client_secret": "s" * 32},
    }
    opaque = [
        {**other, **introspecting},
        {**other, **introspecting, "name": "partner", "issuer": "https://p.example"},
    ]
    with pytest.raises(ConfigError, match="more than one introspection provider"):
        parse_settings({**base, "providers": opaque})
    with pytest.raises(ConfigError, match="has no introspection"):
        parse_settings(
            {**base, "routes": [{"prefix": "/api", "upstream": upstream, "introspect_jwts": True}]}
        )


# -- DPoP at ingress -------------------------------------------------------------------


def dpop_headers(token: str, proof: str) -> dict[str, str]:
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


def bound_token(issuer: FakeIssuer, key: DpopKey) -> str:
    return issuer.mint(cnf={"jkt": key.thumbprint})


async def test_a_dpop_bound_token_with_its_proof_reaches_the_upstream_as_received(
    gateway2: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    key = dpop_key("ES256")
    token = bound_token(issuer, key)
    for path in ("/api/items", "/bound/items"):
        proof = make_proof(key, method="GET", url=f"{PUBLIC_URL}{path}", access_token=token)
        resp = await gateway2.get(f"{path}?page=2", headers=dpop_headers(token, proof))
        assert resp.status == 200, await resp.text()
        seen = upstream[0].seen[-1].headers
        assert seen["Authorization"] == f"DPoP {token}"
        assert seen["DPoP"] == proof


async def test_a_bound_token_is_never_taken_as_bearer(
    gateway2: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    seen = len(upstream[0].seen)
    token = bound_token(issuer, dpop_key("ES256"))
    resp = await gateway2.get("/api/x", headers=bearer(token))
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_token"
    # The challenge names the scheme the token needs (RFC 9449 §7.1), and it is counted.
    assert resp.headers["WWW-Authenticate"].startswith('DPoP error="invalid_token"')
    labels = {"result": "dpop_bound"}
    dpop_refusals = gateway2.app[METRICS].registry.get_sample_value(
        "tokengate_dpop_proofs_total", labels
    )
    assert dpop_refusals == 1
    # A route that requires DPoP takes no Bearer token at all, bound or not.
    resp = await gateway2.get("/bound/x", headers=bearer(issuer.mint()))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith('DPoP error="invalid_token"')
    assert 'algs="' in resp.headers["WWW-Authenticate"]
    assert len(upstream[0].seen) == seen


async def test_dpop_refusals_carry_the_dpop_challenge(
    gateway2: TestClient[Any, Any], issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    seen = len(upstream[0].seen)
    key, other = dpop_key("ES256"), dpop_key("EdDSA")
    token = bound_token(issuer, key)
    url = f"{PUBLIC_URL}/api/x"
    cases = {
        "no proof": ({"Authorization": f"DPoP {token}"}, "invalid_dpop_proof"),
        "two proofs": (
            [
                ("Authorization", f"DPoP {token}"),
                ("DPoP", make_proof(key, method="GET", url=url, access_token=token)),
                ("DPoP", make_proof(key, method="GET", url=url, access_token=token)),
            ],
            "invalid_dpop_proof",
        ),
        "another key": (
            dpop_headers(token, make_proof(other, method="GET", url=url, access_token=token)),
            "invalid_dpop_proof",
        ),
        "another method": (
            dpop_headers(token, make_proof(key, method="POST", url=url, access_token=token)),
            "invalid_dpop_proof",
        ),
        "another path": (
            dpop_headers(token, make_proof(key, method="GET", url=f"{url}/y", access_token=token)),
            "invalid_dpop_proof",
        ),
        "unbound token": (
            dpop_headers(
                issuer.mint(),
                make_proof(key, method="GET", url=url, access_token=issuer.mint()),
            ),
            "invalid_token",
        ),
    }
    for name, (headers, error) in cases.items():
        resp = await gateway2.get("/api/x", headers=headers)
        assert resp.status == 401, name
        assert (await resp.json())["error"] == error, name
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith(f'DPoP error="{error}"'), name
        assert 'algs="ES256 ES384 EdDSA PS256 RS256"' in challenge, name
    assert len(upstream[0].seen) == seen


async def test_a_replayed_proof_is_refused(
    gateway2: TestClient[Any, Any], issuer: FakeIssuer
) -> None:
    key = dpop_key("ES256")
    token = bound_token(issuer, key)
    proof = make_proof(key, method="GET", url=f"{PUBLIC_URL}/api/x", access_token=token)
    assert (await gateway2.get("/api/x", headers=dpop_headers(token, proof))).status == 200
    resp = await gateway2.get("/api/x", headers=dpop_headers(token, proof))
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_dpop_proof"


async def test_no_credentials_get_both_challenges_or_dpops_alone(
    gateway2: TestClient[Any, Any],
) -> None:
    resp = await gateway2.get("/api/x")
    assert resp.headers["WWW-Authenticate"] == 'Bearer, DPoP algs="ES256 ES384 EdDSA PS256 RS256"'
    resp = await gateway2.get("/bound/x")
    assert resp.headers["WWW-Authenticate"] == 'DPoP algs="ES256 ES384 EdDSA PS256 RS256"'


async def test_dpop_as_bearer_sends_the_thumbprint_and_drops_a_clients(
    aiohttp_client: AiohttpClient,
    issuer: FakeIssuer,
    cluster: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    config = two_provider_config(issuer, cluster, upstream[1])
    config["dpop"] = {"upstream": "bearer"}
    client = await aiohttp_client(build_app(parse_settings(config)))
    key = dpop_key("ES256")
    token = bound_token(issuer, key)
    proof = make_proof(key, method="GET", url=f"{PUBLIC_URL}/api/x", access_token=token)
    headers = {**dpop_headers(token, proof), "X-DPoP-Thumbprint": "forged"}
    assert (await client.get("/api/x", headers=headers)).status == 200
    seen = upstream[0].seen[-1].headers
    assert seen["Authorization"] == f"Bearer {token}"
    assert seen.getall("X-DPoP-Thumbprint") == [key.thumbprint]
    assert "DPoP" not in seen
    # On a Bearer request too, the client's thumbprint header never reaches the upstream.
    resp = await client.get("/api/x", headers={**bearer(issuer.mint()), "X-DPoP-Thumbprint": "x"})
    assert resp.status == 200
    assert "X-DPoP-Thumbprint" not in upstream[0].seen[-1].headers


# -- a Kubernetes-style issuer: its own CA, keys fetched with the pod's token ------------


async def test_a_provider_fetches_keys_over_its_own_ca_with_the_token_on_disk(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    upstream: tuple[FakeUpstream, str],
    tmp_path: Path,
) -> None:
    """What a sidecar does with the cluster's service-account issuer: the API server's
    certificate is signed by the cluster CA (``ca_file``), and /openid/v1/jwks wants the
    pod's projected token (``fetch_token_file``), which the kubelet rotates on disk."""
    tls = make_tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    cluster = FakeIssuer()
    seen_tokens: list[str | None] = []

    @web.middleware
    async def authenticated(request: web.Request, handler: Any) -> web.StreamResponse:
        seen_tokens.append(request.headers.get("Authorization"))
        if not (request.headers.get("Authorization") or "").startswith("Bearer sa-"):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        return await handler(request)

    app = cluster.web_app()
    app.middlewares.append(authenticated)
    server = await aiohttp_server(app, host="127.0.0.1", ssl=context)
    cluster.url = f"https://127.0.0.1:{server.port}"
    token_file = tmp_path / "token"
    token_file.write_text("sa-first\n")
    config = base_config("https://unused.example", upstream[1])
    del config["oidc"]
    config["providers"] = [
        {
            "name": "cluster",
            "issuer": cluster.url,
            "audience": "tokengate",
            "ca_file": str(tls.ca),
            "fetch_token_file": str(token_file),
        }
    ]
    config["routes"] = [{"prefix": "/api", "upstream": upstream[1]}]
    client = await aiohttp_client(build_app(parse_settings(config)))
    jwks = client.app[PROVIDERS]["cluster"].jwks
    assert jwks is not None
    await jwks.refresh()
    token = cluster.mint(aud="tokengate", sub="system:serviceaccount:shop:billing")
    assert (await client.get("/api/x", headers=bearer(token))).status == 200
    token_file.write_text("sa-rotated\n")
    await jwks.refresh()
    assert seen_tokens[-1] == "Bearer sa-rotated"
    assert set(seen_tokens) == {"Bearer sa-first", "Bearer sa-rotated"}


# -- introspected JWTs and server nonces, through the gateway ---------------------------


async def test_a_revocation_sensitive_route_introspects_valid_jwts(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    issuer: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    revoked: set[str] = set()
    calls: list[str] = []

    async def introspect(request: web.Request) -> web.Response:
        token = str((await request.post())["token"])
        calls.append(token)
        if token in revoked:
            return web.json_response({"active": False})
        return web.json_response({"active": True, "aud": AUDIENCE, "iss": issuer.url})

    endpoint_app = web.Application()
    endpoint_app.router.add_post("/introspect", introspect)
    endpoint = await aiohttp_server(endpoint_app, host="127.0.0.1")
    config = base_config(issuer.url, upstream[1])
    config["oidc"]["introspection"] = {
        "endpoint": str(endpoint.make_url("/introspect")),
        "client_id": "api",
        "client_secret": "s" * 32,
    }
    config["routes"] = [
        {"prefix": "/pay", "upstream": upstream[1], "introspect_jwts": True},
        {"prefix": "/api", "upstream": upstream[1]},
    ]
    client = await aiohttp_client(build_app(parse_settings(config)))
    good, gone = issuer.mint(), issuer.mint()
    revoked.add(gone)
    assert (await client.get("/pay/x", headers=bearer(good))).status == 200
    assert (await client.get("/pay/x", headers=bearer(good))).status == 200  # answer kept
    resp = await client.get("/pay/x", headers=bearer(gone))
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_token"
    assert calls == [good, gone]
    # Elsewhere the same valid JWT is checked locally only.
    assert (await client.get("/api/x", headers=bearer(gone))).status == 200
    assert calls == [good, gone]
    # A forged JWT is refused by its signature before anyone is asked about it.
    forged = ".".join((*good.split(".")[:2], good.split(".")[2][::-1]))
    assert (await client.get("/pay/x", headers=bearer(forged))).status == 401
    assert calls == [good, gone]


async def test_with_server_nonces_a_proof_without_one_is_told_the_nonce(
    aiohttp_client: AiohttpClient,
    issuer: FakeIssuer,
    cluster: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    config = two_provider_config(issuer, cluster, upstream[1])
    config["dpop"] = {"nonce": True, "nonce_secret": "n" * 32}
    client = await aiohttp_client(build_app(parse_settings(config)))
    key = dpop_key("ES256")
    token = bound_token(issuer, key)
    url = f"{PUBLIC_URL}/api/x"
    resp = await client.get(
        "/api/x",
        headers=dpop_headers(token, make_proof(key, method="GET", url=url, access_token=token)),
    )
    assert resp.status == 401
    assert (await resp.json())["error"] == "use_dpop_nonce"
    assert resp.headers["WWW-Authenticate"].startswith('DPoP error="use_dpop_nonce"')
    nonce = resp.headers["DPoP-Nonce"]
    proof = make_proof(key, method="GET", url=url, access_token=token, nonce=nonce)
    resp = await client.get("/api/x", headers=dpop_headers(token, proof))
    assert resp.status == 200
    forged = make_proof(key, method="GET", url=url, access_token=token, nonce=nonce[::-1])
    resp = await client.get("/api/x", headers=dpop_headers(token, forged))
    assert (await resp.json())["error"] == "use_dpop_nonce"


def test_check_config_shows_every_provider_oidcs_first() -> None:
    config = base_config("https://idp.example", "http://127.0.0.1:9")
    config["providers"] = [{"name": "cluster", "issuer": "https://k8s.example", "audience": "x"}]
    dumped = dump_settings(parse_settings(config))
    assert [(p["name"], p["issuer"]) for p in dumped["token_providers"]] == [
        ("oidc", "https://idp.example"),
        ("cluster", "https://k8s.example"),
    ]

"""Forwarding: headers both ways, paths, streaming, limits and upstream failures."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import UPSTREAM_HTTP, UPSTREAM_POOL, build_app
from gateway.settings import Settings, parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.upstream import FakeUpstream
from tests.support.memory import peak_rss_bytes, reset_peak_rss

Gateway = TestClient[Any, Any]
Upstream = tuple[FakeUpstream, str]


# Every test here runs through both upstream clients: our HTTP/1.1 pool and aiohttp's.
@pytest.fixture(params=["http1", "aiohttp"])
def upstream_client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(issuer: FakeIssuer, upstream: Upstream, upstream_client: str) -> Settings:
    return parse_settings(
        base_config(issuer.url, upstream[1], upstream={"client": upstream_client})
    )


async def test_hop_by_hop_headers_are_removed_both_ways(
    gateway: Gateway, upstream: Upstream
) -> None:
    resp = await gateway.get(
        "/public/x",
        headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Kept": "yes",
        },
    )
    assert resp.status == 200
    seen = upstream[0].seen[-1].headers
    for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Proxy-Authorization"):
        assert name not in seen
    assert seen["X-Kept"] == "yes"
    assert "X-Upstream-Hop" not in resp.headers  # named in the upstream's Connection
    assert "Keep-Alive" not in resp.headers


async def test_forwarded_headers_and_request_id(gateway: Gateway, upstream: Upstream) -> None:
    resp = await gateway.get(
        "/public/x", headers={"X-Forwarded-For": "203.0.113.7", "X-Request-Id": "abc-123"}
    )
    seen = upstream[0].seen[-1].headers
    assert seen["X-Forwarded-For"] == "127.0.0.1"  # a client's own is not believed
    assert seen["X-Forwarded-Proto"] == "http"  # public_url's
    assert seen["X-Forwarded-Host"] == "localhost:8080"
    assert seen["X-Request-Id"] == "abc-123"
    assert resp.headers["X-Request-Id"] == "abc-123"


async def test_unsafe_request_id_is_replaced(gateway: Gateway, upstream: Upstream) -> None:
    resp = await gateway.get("/public/x", headers={"X-Request-Id": "a b\u00e9<script>"})
    assert re.fullmatch(r"[0-9a-f]{22}", resp.headers["X-Request-Id"])
    assert upstream[0].seen[-1].headers["X-Request-Id"] == resp.headers["X-Request-Id"]


async def raw_request(gateway: Gateway, target: str) -> int:
    """Send ``target`` byte for byte (client libraries normalise paths); return the status."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


async def test_normalised_path_is_routed_and_forwarded(
    gateway: Gateway, upstream: Upstream
) -> None:
    # Dot segments, plain or encoded, must not climb out of /public into the bearer /api.
    assert await raw_request(gateway, "/public/../api/secret") == 401
    assert await raw_request(gateway, "/public/%2e%2e/api/secret") == 401
    assert upstream[0].seen == []
    assert await raw_request(gateway, "/public//a/./b/../c?x=1&y=%2F") == 200
    assert upstream[0].seen[-1].path == "/public/a/c?x=1&y=%2F"


async def test_encoded_slash_is_refused(gateway: Gateway, upstream: Upstream) -> None:
    assert await raw_request(gateway, "/public%2F..%2Fapi/x") == 400
    assert await raw_request(gateway, "/public/..%5Capi") == 400
    assert upstream[0].seen == []


async def test_strip_prefix_joins_upstream_base(gateway: Gateway, upstream: Upstream) -> None:
    await gateway.get("/strip/v1/items")
    assert upstream[0].seen[-1].path == "/base/v1/items"


async def test_no_route_is_404_json(gateway: Gateway) -> None:
    resp = await gateway.get("/nowhere")
    assert resp.status == 404
    assert await resp.json() == {
        "error": "not_found",
        "error_description": "no route matches this path",
    }


async def test_failed_authorization_is_never_forwarded(
    gateway: Gateway, issuer: FakeIssuer, upstream: Upstream
) -> None:
    resp = await gateway.get("/api/x", headers={"Authorization": "Bearer forged.token.value"})
    assert resp.status == 401
    assert upstream[0].seen == []


@pytest.mark.parametrize(
    "value",
    ["Bearer a b.c.d", "Bearer \xe4bc.def.ghi", "Bearer abc.def.ghi=x", "Bearer ", "Bearer a.b"],
)
async def test_a_token_outside_the_jws_syntax_is_401_and_never_forwarded(
    gateway: Gateway, issuer: FakeIssuer, upstream: Upstream, value: str
) -> None:
    valid = issuer.mint()
    for _ in range(2):  # the second time from the verified-token cache
        assert (await gateway.get("/api/x", headers={"Authorization": f"Bearer {valid}"})).ok
    resp = await gateway.get("/api/x", headers={"Authorization": value})
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_token"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert len(upstream[0].seen) == 2  # only the valid token's requests


async def test_upstream_cannot_plant_our_session_cookie(
    aiohttp_client: Any, issuer: FakeIssuer, upstream: Upstream
) -> None:
    config = base_config(issuer.url, upstream[1])
    config["oidc"]["client_id"] = "spa"
    config["session"] = {"store": "memory"}
    config["routes"].append({"prefix": "/setcookie", "upstream": upstream[1], "auth": "session"})
    client = await aiohttp_client(build_app(parse_settings(config)))
    resp = await client.get("/public/x", headers={"Cookie": "__Host-tokengate=abc; theme=dark"})
    assert upstream[0].seen[-1].headers["Cookie"] == "theme=dark"
    config["routes"][0]["prefix"] = "/setcookie"
    resp = await client.get("/setcookie", headers={"Authorization": f"Bearer {issuer.mint()}"})
    cookies = resp.headers.getall("Set-Cookie")
    assert any(c.startswith("app=") for c in cookies)
    assert not any(c.startswith("__Host-tokengate=") for c in cookies)
    assert resp.headers["X-Note"] == "__Host-tokengate=is-our-cookie-name"


async def test_body_over_limit_by_content_length_is_413(
    gateway: Gateway, upstream: Upstream
) -> None:
    resp = await gateway.post("/public/upload", data=io.BytesIO(b"x" * (1024 * 1024 + 1)))
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    assert upstream[0].seen == []


async def test_chunked_body_over_limit_is_413(gateway: Gateway, upstream: Upstream) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    resp = await gateway.post("/public/upload", data=chunks())
    assert resp.status == 413


async def test_header_limits_are_431(gateway: Gateway, upstream: Upstream) -> None:
    resp = await gateway.get("/public/x", headers={"X-Big": "x" * 20_000})
    assert resp.status == 431
    assert (await resp.json())["error"] == "request_header_fields_too_large"
    many = {f"X-H-{i}": "v" for i in range(120)}
    assert (await gateway.get("/public/x", headers=many)).status == 431
    assert upstream[0].seen == []


async def test_upload_and_download_stream_without_buffering(
    gateway: Gateway, upstream: Upstream
) -> None:
    size = 256 * 1024 * 1024
    reset_peak_rss()  # else an earlier, higher peak in this process hides a regression
    before = peak_rss_bytes()

    async def body() -> AsyncIterator[bytes]:
        block = b"u" * (1024 * 1024)
        for _ in range(size // len(block)):
            yield block

    resp = await gateway.post("/big/upload", data=body())
    assert resp.status == 200
    assert (await resp.json())["body_bytes"] == size
    resp = await gateway.get(f"/big/download/{size}")
    received = 0
    async for chunk in resp.content.iter_any():
        received += len(chunk)
    assert received == size
    # Both directions moved 256 MiB through one process; the peak barely moved.
    assert peak_rss_bytes() - before < 64 * 1024 * 1024


async def test_upstream_refused_is_502(
    aiohttp_client: Any, issuer: FakeIssuer, upstream_client: str
) -> None:
    config = base_config(issuer.url, "http://127.0.0.1:1", upstream={"client": upstream_client})
    client = await aiohttp_client(build_app(parse_settings(config)))
    resp = await client.get("/public/x")
    assert resp.status == 502
    assert (await resp.json())["error"] == "upstream_unavailable"


async def test_an_upstream_client_that_cannot_send_is_502_never_500(
    aiohttp_client: Any, issuer: FakeIssuer, upstream: Upstream, upstream_client: str
) -> None:
    # The app's upstream clients closed under it (as at shutdown): the pool raises its own
    # PoolClosedError, aiohttp's session a RuntimeError; both are the upstream side's.
    config = base_config(issuer.url, upstream[1], upstream={"client": upstream_client})
    app = build_app(parse_settings(config))
    client = await aiohttp_client(app)
    if upstream_client == "http1":
        await app[UPSTREAM_POOL].aclose()
    else:
        await app[UPSTREAM_HTTP].close()
    resp = await client.get("/public/x")
    assert resp.status == 502
    assert (await resp.json())["error"] == "upstream_unavailable"
    assert upstream[0].seen == []


async def test_upstream_timeout_is_504(gateway: Gateway, upstream: Upstream) -> None:
    resp = await gateway.get("/slow/x")
    assert resp.status == 504
    assert (await resp.json())["error"] == "upstream_timeout"
    upstream[0].release.set()


async def test_unexpected_error_is_500_json_without_trace(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway import routing

    def explode(path: str) -> str:
        raise RuntimeError("secret-detail-in-exception")

    monkeypatch.setattr("gateway.app.parse_path", explode)
    resp = await gateway.get("/public/x")
    assert resp.status == 500
    text = await resp.text()
    assert "secret-detail" not in text
    assert "Traceback" not in text
    assert (await resp.json())["error"] == "internal_error"
    assert routing.parse_path("/a") == "/a"


async def test_websocket_is_proxied_after_authentication(
    gateway: Gateway, issuer: FakeIssuer, upstream: Upstream
) -> None:
    async with gateway.ws_connect(
        "/ws/chat", headers={"Authorization": f"Bearer {issuer.mint()}"}, protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
        await ws.send_bytes(b"abc")
        assert await ws.receive_bytes() == b"cba"
    assert upstream[0].seen[-1].headers["Authorization"].startswith("Bearer ")


async def test_websocket_without_token_never_reaches_upstream(
    gateway: Gateway, upstream: Upstream
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await gateway.ws_connect("/ws/chat")
    assert raised.value.status == 401
    assert upstream[0].seen == []


async def test_client_disconnect_during_slow_upstream_is_not_an_error(
    gateway: Gateway, upstream: Upstream
) -> None:
    task = asyncio.ensure_future(gateway.get("/slow/x", timeout=aiohttp.ClientTimeout(total=5)))
    await upstream[0].arrived.wait()
    task.cancel()
    upstream[0].release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await gateway.get("/public/ok")).status == 200


async def test_every_kind_of_response_carries_the_request_id(
    gateway: Gateway, issuer: FakeIssuer
) -> None:
    streamed = await gateway.get("/public/download/200000", headers={"X-Request-Id": "r-1"})
    assert (streamed.status, streamed.headers["X-Request-Id"]) == (200, "r-1")
    assert len(await streamed.read()) == 200_000
    refused = await gateway.get("/api/x", headers={"X-Request-Id": "r-2"})
    assert (refused.status, refused.headers["X-Request-Id"]) == (401, "r-2")
    missing = await gateway.get("/nowhere", headers={"X-Request-Id": "r-3"})
    assert (missing.status, missing.headers["X-Request-Id"]) == (404, "r-3")
    async with gateway.ws_connect(
        "/ws/chat", headers={"Authorization": f"Bearer {issuer.mint()}", "X-Request-Id": "r-4"}
    ) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "echo:hi"
        assert ws._response.headers["X-Request-Id"] == "r-4"

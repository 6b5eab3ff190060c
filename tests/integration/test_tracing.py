"""Spans of browser sessions, exported to an OTLP receiver, against the real oidc-provider
and a real redis-server: the refresh under the request that started it, each waiting
request's wait, the lock wait on a second replica, and no credential in any span.
"""

from __future__ import annotations

import asyncio
import base64
import time
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from gateway.app import STORE
from gateway.sessions.model import Session
from tests.integration.conftest import Bff
from tests.integration.test_refresh_concurrency import (
    handle_of,
    refresh_grants,
    set_expiry,
    until_idp_counts_a_token_request,
)
from tests.integration.test_refresh_resilience import bff_on
from tests.support.idp import CLIENT_SECRET, OidcProviderProcess, complete_login, complete_logout
from tests.support.otlp import OtlpReceiver, SpanTree, every_text
from tests.support.redis_server import RedisServerProcess

pytestmark = pytest.mark.integration


def traced_bff(
    idp: OidcProviderProcess, redis_url: str, receiver: OtlpReceiver, service: str
) -> AbstractAsyncContextManager[Bff]:
    """A tokengate exporting its spans to ``receiver`` as ``service``; closed (and so
    flushed) on the way out."""
    return bff_on(idp, redis_url, tracing=receiver.tracing_config(service_name=service))


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{'ab' * 8}-01"


async def get(
    http: aiohttp.ClientSession, url: str, trace_id: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    headers = {"X-CSRF": "1", "traceparent": traceparent(trace_id), **headers}
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


def server_span(tree: SpanTree) -> Any:
    [server] = [s for s in tree.spans if s.kind == "SERVER"]
    assert server.parent_span_id == "ab" * 8  # the client's span
    return server


async def test_refresh_spans_sit_under_the_requests_that_started_and_waited_for_them(
    idp: OidcProviderProcess, redis_server: RedisServerProcess, receiver: OtlpReceiver
) -> None:
    async with traced_bff(idp, redis_server.url, receiver, "replica-a") as a:
        browser = a.browser()
        await a.login(browser)
        # The second replica after the login: starting it points the IdP's client at it.
        async with traced_bff(idp, redis_server.url, receiver, "replica-b") as b:
            handle = handle_of(a, browser)
            await set_expiry(a, handle, time.time() - 1)
            await idp.reset()
            await idp.set_token_behaviour(delay_ms=1000, grant_type="refresh_token", times=1)
            starter, joiner, other = "1" * 32, "2" * 32, "3" * 32
            first = asyncio.ensure_future(get(browser, f"{a.url}/api/items", starter))
            await until_idp_counts_a_token_request(a)  # replica a holds the lock now
            results = await asyncio.gather(
                get(browser, f"{a.url}/api/items", joiner),  # joins a's flight
                get(browser, f"{b.url}/api/items", other),  # finds the lock held
            )
            assert [status for status, _ in (await first, *results)] == [200] * 3
            assert await refresh_grants(a) == 1

            names = ["GET api", "session refresh", "refresh wait"]
            started = await receiver.wait_for_spans(names, trace_id=starter)
            joined = await receiver.wait_for_spans(["GET api", "refresh wait"], trace_id=joiner)
            waited = await receiver.wait_for_spans([*names, "refresh lock wait"], trace_id=other)

    # Replica a: the refresh under the request that started it, which waited for it.
    server = server_span(started)
    assert server.service == "replica-a"
    refresh = started.one("session refresh")
    assert refresh.parent_span_id == server.span_id
    assert refresh.attributes["tokengate.refresh.result"] == "success"
    assert refresh.attributes["tokengate.refresh.forced"] is False
    assert "tokengate.refresh.waited_for_lock" not in refresh.attributes
    assert started.one("refresh wait").parent_span_id == server.span_id
    assert started.named("refresh lock wait") == []

    # The request that joined a's flight waited for it, and refreshed nothing itself.
    server = server_span(joined)
    assert joined.one("refresh wait").parent_span_id == server.span_id
    assert joined.named("session refresh") == []

    # Replica b found the lock held: its refresh waited for a's, and took a's result.
    server = server_span(waited)
    assert server.service == "replica-b"
    refresh = waited.one("session refresh")
    assert refresh.parent_span_id == server.span_id
    assert refresh.attributes["tokengate.refresh.waited_for_lock"] is True
    assert "tokengate.refresh.result" not in refresh.attributes  # no grant of its own
    lock_wait = waited.one("refresh lock wait")
    assert lock_wait.parent_span_id == refresh.span_id
    assert lock_wait.attributes["tokengate.lock.held_by"] == "another_replica"
    assert waited.one("refresh wait").parent_span_id == server.span_id


def cookie_values(browser: aiohttp.ClientSession) -> set[str]:
    return {cookie.value for cookie in browser.cookie_jar if len(cookie.value) >= 8}


def session_secrets(session: Session | None) -> set[str]:
    assert session is not None
    assert session.refresh_token is not None
    assert session.id_token is not None
    tokens = {session.access_token, session.refresh_token, session.id_token}
    # A JWT's signature alone would be a leak too (and its claims say who).
    parts = {part for token in tokens for part in token.split(".")[1:] if len(part) >= 16}
    return tokens | parts


async def test_no_credential_of_a_whole_session_is_in_any_exported_span(
    idp: OidcProviderProcess, redis_server: RedisServerProcess, receiver: OtlpReceiver
) -> None:
    secrets = {CLIENT_SECRET, base64.b64encode(f"tokengate:{CLIENT_SECRET}".encode()).decode()}
    async with traced_bff(idp, redis_server.url, receiver, "tokengate") as bff:
        store = bff.app[STORE]
        browser = bff.browser()
        # Login: the authorization code and state as the browser carried them.
        callback = await complete_login(browser, f"{bff.url}/auth/login?return_to=/app")
        query = parse_qs(urlsplit(callback).query)
        secrets |= {query["code"][0], query["state"][0]}
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302
        secrets |= cookie_values(browser)
        handle = handle_of(bff, browser)
        secrets |= session_secrets(await store.load(handle))
        status, _ = await bff.api(browser, "/api/me")
        assert status == 200

        # Refresh: the access token expired; the next request gets new tokens.
        await set_expiry(bff, handle, time.time() - 1)
        await idp.reset()
        status, _ = await bff.api(browser, "/api/items")
        assert status == 200
        assert await refresh_grants(bff) == 1
        refreshed = await store.load(handle)
        secrets |= session_secrets(refreshed)
        assert refreshed is not None

        # Bearer: the new access token, sent by a client of its own.
        async with aiohttp.ClientSession() as api_client:
            bearer = {"Authorization": f"Bearer {refreshed.access_token}"}
            async with api_client.get(f"{bff.url}/api/items", headers=bearer) as resp:
                assert resp.status == 200
        secrets |= {seen.headers["Authorization"] for seen in bff.upstream.seen}

        # Logout here, then at the IdP (whose back-channel call reaches us too).
        status, body = await bff.api(browser, "/auth/logout", method="POST")
        assert status == 200
        secrets |= {
            value
            for values in parse_qs(urlsplit(body["logout_url"]).query).values()
            for value in values
            if len(value) >= 16
        }
        await complete_logout(browser, body["logout_url"])
        secrets |= cookie_values(browser)
    # The app is closed: every span it recorded has been flushed to the receiver.

    spans = receiver.spans
    names = {span.name for span in spans}
    assert {"GET api", "session refresh", "refresh wait", "session load"} <= names, names
    assert {"discovery", "jwks fetch"} <= names, names
    assert {s.attributes.get("tokengate.refresh.result") for s in spans} >= {"success"}
    assert len(receiver.trace_ids()) >= 5  # login, callback, api calls, bearer, logout
    secrets = {secret for secret in secrets if len(secret) >= 8}
    assert len(secrets) >= 12
    texts = list(every_text(spans))
    assert texts
    for secret in secrets:
        leaked = [text for text in texts if secret in text]
        assert not leaked, f"a credential is in a span: {leaked}"
        assert not [body for body in receiver.bodies if secret.encode() in body]

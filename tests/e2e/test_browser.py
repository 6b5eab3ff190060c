"""The demo in a real browser: headless Chromium logs in through the IdP's forms, calls the
API through tokengate, outlives an access token, logs out, and is attacked from another
origin. Counts are taken where effects happen: refresh grants at the IdP, requests at the
demo API.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import BrowserContext, Page, Request, Response, expect

from demo.stack import COOKIE_NAME, REPO_ROOT, DemoStack
from gateway.sessions.redis_store import RedisSessionStore
from tests.conftest import AiohttpServer
from tests.e2e.conftest import (
    api_requests,
    idp_call,
    log_in,
    session_cookie,
    stored_session,
)

pytestmark = pytest.mark.e2e

SCREENSHOT = REPO_ROOT / "docs" / "demo.png"
BURST = 20


async def test_login_through_the_idp_forms_then_the_api_returns_the_users_claims(
    page: Page, demo: DemoStack
) -> None:
    errors: list[str] = []  # CSP violations and script errors show up here
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await log_in(page, demo)
    errors.clear()  # the IdP's pages fail to load a web font (offline); not ours
    await expect(page.locator("#claims")).to_contain_text("alice@example.test")

    async with page.expect_response(f"{demo.url}/api/me") as called:
        await page.get_by_role("button", name="Call API").click()
    response = await called.value
    assert response.status == 200
    body = await response.json()
    assert body["claims"]["sub"] == "alice"
    assert "api.read" in body["claims"]["scope"].split()
    await expect(page.locator("#api-claims")).to_contain_text("alice")
    await expect(page.locator("#log li").first).to_have_attribute("data-status", "200")
    await page.reload()
    await expect(page.locator("#status")).to_have_text("Logged in as alice")
    assert errors == []


class Recorder:
    """What a browser context sent and received, as text: URLs, headers, bodies.

    Bodies are read as each request finishes; ``settle()`` waits until no request is in
    flight and every read is done. Call it before the page navigates away: Chromium drops
    a page's response bodies when it leaves the page.
    """

    def __init__(self, context: BrowserContext) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._reads: list[asyncio.Task[tuple[str, str]]] = []
        context.on("request", self._started)
        context.on("requestfinished", self._finished)
        context.on("requestfailed", lambda request: self._done())

    def _started(self, request: Request) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _finished(self, request: Request) -> None:
        self._reads.append(asyncio.create_task(self._read(request)))

    def _done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def _read(self, request: Request) -> tuple[str, str]:
        try:
            response = await request.response()
            parts = [request.url]
            parts += [f"{k}: {v}" for k, v in (await request.all_headers()).items()]
            if response is not None:
                if not 300 <= response.status < 400:  # a redirect has no body
                    parts.append((await response.body()).decode("utf-8", "replace"))
                parts += [f"{k}: {v}" for k, v in (await response.all_headers()).items()]
            return request.url, "\n".join(parts)
        finally:
            self._done()

    async def settle(self) -> list[tuple[str, str]]:
        await self._idle.wait()
        return await asyncio.gather(*self._reads)


async def test_the_page_never_holds_a_token_nor_reads_the_session_cookie(
    context: BrowserContext, page: Page, demo: DemoStack, session_store: RedisSessionStore
) -> None:
    recorder = Recorder(context)

    async def settle() -> None:
        await recorder.settle()

    await log_in(page, demo, before_leaving=settle)
    first = await stored_session(context, demo, session_store)
    async with page.expect_response(f"{demo.url}/api/me"):
        await page.get_by_role("button", name="Call API").click()
    async with page.expect_response(f"{demo.url}/api/items"):
        await page.get_by_role("button", name="Add item").click()
    await settle()
    await page.reload()
    await expect(page.locator("#status")).to_have_text("Logged in as alice")
    last = await stored_session(context, demo, session_store)

    cookie = await session_cookie(context, demo)
    assert cookie is not None
    assert cookie not in await page.evaluate("document.cookie")
    assert f"{COOKIE_NAME}=" not in await page.evaluate("document.cookie")
    ours = [c for c in await context.cookies(demo.url) if c.get("name") == COOKIE_NAME]
    assert [c.get("httpOnly") for c in ours] == [True]

    assert first is not None
    assert last is not None
    tokens = {
        f"{name} ({when})": value
        for when, session in (("after login", first), ("at the end", last))
        for name, value in (
            ("access token", session.access_token),
            ("refresh token", session.refresh_token),
            ("ID token", session.id_token),
        )
        if value
    }
    assert len(tokens) >= 3
    seen = await recorder.settle()
    assert any(url.startswith(f"{demo.url}/api/me") for url, _ in seen)
    assert any(url.startswith(f"{demo.idp_url}/interaction/") for url, _ in seen)
    leaks = [(url, name) for url, text in seen for name, token in tokens.items() if token in text]
    assert leaks == []


async def test_twenty_calls_after_the_access_token_expired_cause_one_refresh(
    page: Page,
    context: BrowserContext,
    demo: DemoStack,
    session_store: RedisSessionStore,
    http: aiohttp.ClientSession,
) -> None:
    await log_in(page, demo)
    async with page.expect_response(f"{demo.url}/api/me"):
        await page.get_by_role("button", name="Call API").click()
    await idp_call(http, demo, "POST", "/__test/reset")
    before = await stored_session(context, demo, session_store)
    assert before is not None

    # The IdP's clock decides when the token dies, so this wait is real: exactly until the
    # stored expiry has passed, no fixed guess.
    await asyncio.sleep(max(0.0, before.access_expires_at - time.time()) + 0.05)
    statuses = await page.evaluate(
        """(n) => Promise.all(Array.from({length: n}, () =>
             fetch('/api/me', {headers: {'X-CSRF': '1'}}).then((r) => r.status)))""",
        BURST,
    )

    assert statuses == [200] * BURST
    stats = await idp_call(http, demo, "GET", "/__test/stats")
    assert stats["grants"].get("refresh_token") == 1, stats
    after = await stored_session(context, demo, session_store)
    assert after is not None
    assert after.access_token != before.access_token
    assert after.access_expires_at > time.time()
    async with page.expect_response(f"{demo.url}/api/me"):
        await page.get_by_role("button", name="Call API").click()
    await expect(page.locator("#log li").first).to_contain_text("refreshed by tokengate")


async def test_logout_ends_the_session_in_every_tab(
    context: BrowserContext, page: Page, demo: DemoStack
) -> None:
    await log_in(page, demo)
    other_tab = await context.new_page()
    await other_tab.goto("/")
    await expect(other_tab.locator("#status")).to_have_text("Logged in as alice")

    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(f"{demo.idp_url}/session/end**")  # the IdP's own logout
    await page.get_by_role("button", name="Yes, sign me out").click()
    await page.wait_for_url(f"{demo.url}/")
    await expect(page.locator("#status")).to_have_text("Not logged in")
    after: dict[str, Any] = await page.evaluate(
        """async () => {
             const headers = {'X-CSRF': '1'};
             const session = await (await fetch('/auth/session', {headers})).json();
             const api = (await fetch('/api/me', {headers})).status;
             return {session, api};
           }"""
    )
    assert after == {"session": {"authenticated": False}, "api": 401}

    await other_tab.get_by_role("button", name="Call API").click()
    await expect(other_tab.locator("#log li[data-path='/api/me']").first).to_have_attribute(
        "data-status", "401"
    )
    await expect(other_tab.locator("#status")).to_have_text("Not logged in")
    assert await session_cookie(context, demo) is None


def other_site(target: str) -> web.Application:
    """A page on another origin that tries to use the browser's tokengate session."""
    page = f"""<!doctype html>
<title>another site</title>
<form id="post" method="post" action="{target}/api/items" enctype="text/plain">
  <input type="hidden" name='{{"text": "from another site", "x": "' value='"}}'>
</form>
<a id="link" href="{target}/api/me">the API</a>
<script>
  const target = {target!r};
  async function attempt(path, init) {{
    try {{
      return (await fetch(target + path, {{credentials: 'include', ...init}})).status;
    }} catch (err) {{
      return 'blocked';
    }}
  }}
  window.results = (async () => ({{
    fetch_with_cookies: await attempt('/api/me', {{}}),
    fetch_with_csrf_header: await attempt('/api/me', {{headers: {{'X-CSRF': '1'}}}}),
    no_cors_post: await attempt('/api/items', {{
      method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}},
      body: '{{"text": "from another site"}}',
    }}),
  }}))();
</script>
"""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    return app


async def test_requests_from_another_origin_never_reach_the_api(
    context: BrowserContext,
    page: Page,
    demo: DemoStack,
    http: aiohttp.ClientSession,
    aiohttp_server: AiohttpServer,
) -> None:
    await log_in(page, demo)
    server = await aiohttp_server(other_site(demo.url), host="127.0.0.1")
    before = await api_requests(http, demo)
    answered: list[Response] = []
    page.on("response", lambda r: answered.append(r) if r.url.startswith(demo.url) else None)

    await page.goto(str(server.make_url("/")))
    results = await page.evaluate("window.results")
    # Cross-site subresources carry no SameSite=Lax cookie, CORS hides the answers, and
    # the custom header needs a preflight tokengate never grants; no-cors is opaque.
    assert results == {
        "fetch_with_cookies": "blocked",
        "fetch_with_csrf_header": "blocked",
        "no_cors_post": 0,
    }
    async with page.expect_response(f"{demo.url}/api/items") as posted:
        await page.locator("#post").evaluate("(form) => form.submit()")
    form_post = await posted.value
    assert form_post.status == 401  # a cross-site POST navigation: Lax withholds the cookie
    await page.wait_for_url(f"{demo.url}/api/items")
    await page.goto(str(server.make_url("/")))
    async with page.expect_response(f"{demo.url}/api/me") as followed:
        await page.locator("#link").click()
    link = await followed.value
    assert link.status == 403  # a top-level GET carries the cookie, but not the X-CSRF header
    assert (await link.json())["error"] == "csrf"

    assert [r.status for r in answered if r.ok] == []
    assert await api_requests(http, demo) == before


async def test_a_bearer_token_from_the_demo_idp_works_without_a_browser(
    demo: DemoStack, http: aiohttp.ClientSession
) -> None:
    token = await demo.fetch_access_token("bob")  # what `demo/run.py --token` prints
    before = await api_requests(http, demo)
    async with http.get(f"{demo.url}/api/me", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["claims"]["sub"] == "bob"
    assert token not in json.dumps(body)
    async with http.get(
        f"{demo.url}/api/me", headers={"Authorization": f"Bearer {token}x"}
    ) as resp:
        assert resp.status == 401
    assert await api_requests(http, demo) == before + 1


async def test_screenshot_of_the_spa_after_login(page: Page, demo: DemoStack) -> None:
    await log_in(page, demo)
    async with page.expect_response(f"{demo.url}/api/me"):
        await page.get_by_role("button", name="Call API").click()
    await page.locator("#item-text").fill("Watch the access token refresh")
    async with page.expect_response(f"{demo.url}/api/items"):
        await page.get_by_role("button", name="Add item").click()
    await expect(page.locator("#items")).to_contain_text("Watch the access token refresh")
    await expect(page.locator("#api-claims")).to_contain_text("api.read")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    png = await page.screenshot(path=SCREENSHOT)
    assert len(png) > 10_000

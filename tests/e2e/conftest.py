"""The browser tests' world: the demo stack on free ports, headless Debian Chromium driven by
Playwright's async API, a login through the IdP's real forms, and a browser's session read
back from Redis (to know the real tokens, so the tests can look for them where they must
not be).

The stack starts once per run with 4 s access tokens and ``refresh.ahead_s`` 1, so a real
expiry is a short wait. Chromium never leaves loopback: any other URL is aborted.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    async_playwright,
    expect,
)

from demo.stack import COOKIE_NAME, DemoPorts, DemoStack
from gateway.metrics import Metrics
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from gateway.sessions.model import Session
from gateway.sessions.redis_store import RedisSessionStore, build_redis
from gateway.settings import SessionSettings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1100, "height": 700}
ACCESS_TOKEN_TTL_S = 4
TIMEOUT_MS = 10_000
# The IdP's pages @import a web font; the machine is offline, so fail such loads at once.
NOT_LOOPBACK = re.compile(r"^(?!(?:https?|wss?)://(?:localhost|127\.0\.0\.1)[:/]).+")

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="session")
def demo() -> Iterator[DemoStack]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    stack = DemoStack(
        DemoPorts.free(), access_token_ttl_s=ACCESS_TOKEN_TTL_S, refresh_ahead_s=1, store="redis"
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def context(browser: Browser, demo: DemoStack) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(viewport=VIEWPORT, base_url=demo.url)
    context.set_default_timeout(TIMEOUT_MS)
    await context.route(NOT_LOOPBACK, lambda route: route.abort())
    yield context
    await context.close()


@pytest.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def session_store(demo: DemoStack) -> AsyncIterator[RedisSessionStore]:
    """tokengate's own Redis store, to read a browser's session as tokengate sees it."""
    settings = SessionSettings(**demo.gateway_config()["session"])
    store = RedisSessionStore(settings, build_redis(settings), Metrics())
    yield store
    await store.aclose()


async def _nothing() -> None:
    return None


async def log_in(
    page: Page,
    demo: DemoStack,
    username: str = "alice",
    *,
    before_leaving: Callable[[], Awaitable[None]] = _nothing,
) -> None:
    """From the SPA, through the IdP's login form (and consent form), back to the SPA.
    ``before_leaving`` is awaited before each step that navigates away from a page."""
    status = page.locator("#status")
    await page.goto("/")
    await expect(status).to_have_text("Not logged in")
    await before_leaving()
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{demo.idp_url}/interaction/**")
    await page.locator("input[name=login]").fill(username)
    await page.locator("input[name=password]").fill("demo")  # the IdP takes any password
    await before_leaving()
    await page.get_by_role("button", name="Sign-in").click()
    consent = page.get_by_role("button", name="Continue")
    await expect(status.or_(consent)).to_be_visible()
    if await consent.is_visible():
        await before_leaving()
        await consent.click()
    await page.wait_for_url(f"{demo.url}/")
    await expect(status).to_have_text(f"Logged in as {username}")


async def session_cookie(context: BrowserContext, demo: DemoStack) -> str | None:
    for cookie in await context.cookies(demo.url):
        if cookie.get("name") == COOKIE_NAME and cookie.get("value"):
            return cookie.get("value")
    return None


async def stored_session(
    context: BrowserContext, demo: DemoStack, store: RedisSessionStore
) -> Session | None:
    """The session behind the browser's cookie, from Redis: the cookie's secret gives the
    storage id and the key, exactly as tokengate derives them."""
    secret = parse_secret(await session_cookie(context, demo))
    if secret is None:
        return None
    return await store.load(derive_handle(secret))


async def idp_call(http: aiohttp.ClientSession, demo: DemoStack, method: str, path: str) -> Any:
    async with http.request(method, f"{demo.idp_url}{path}", json={}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def api_requests(http: aiohttp.ClientSession, demo: DemoStack) -> int:
    """Requests that reached the demo API's /api/*, counted by the API itself."""
    async with http.get(f"{demo.api_url}/__demo/stats") as resp:
        assert resp.status == 200
        count: int = (await resp.json())["requests"]
        return count

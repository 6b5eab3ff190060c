"""The application's wiring: every resource made in a cleanup context, closed in reverse."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.app import IDP_HTTP, PROVIDERS, REFRESHER, STORE, UPSTREAM_HTTP, build_app
from gateway.settings import parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.upstream import FakeUpstream

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def recorded(ctx: CleanupCtx, events: list[str]) -> CleanupCtx:
    async def wrapper(app: web.Application) -> AsyncIterator[None]:
        events.append(f"open {ctx.__name__}")
        async for _ in ctx(app):
            yield
        events.append(f"close {ctx.__name__}")

    return wrapper


async def test_resources_open_in_order_and_close_in_reverse(
    aiohttp_client: Any, issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    config = base_config(issuer.url, upstream[1])
    config["oidc"]["client_id"] = "spa"
    config["session"] = {"store": "memory"}
    config["routes"].append({"prefix": "/app", "upstream": upstream[1], "auth": "session"})
    app = build_app(parse_settings(config))
    events: list[str] = []
    names = [ctx.__name__ for ctx in app.cleanup_ctx]
    assert names == [
        "metrics_flush",
        "access_log",
        "traces",
        "upstream_http",
        "idp_http",
        "token_keys",
        "session_store",
        "sessions",
        "proxy",
    ]
    wrapped = [recorded(ctx, events) for ctx in app.cleanup_ctx]
    app.cleanup_ctx.clear()
    app.cleanup_ctx.extend(wrapped)
    client = await aiohttp_client(app)
    assert (await client.get("/public/x")).status == 200
    jwks = app[PROVIDERS]["oidc"].jwks
    assert jwks is not None
    jwks_task = jwks._refresher
    await client.close()
    opened = [e.removeprefix("open ") for e in events if e.startswith("open")]
    closed = [e.removeprefix("close ") for e in events if e.startswith("close")]
    assert opened == names
    assert closed == list(reversed(names))
    assert app[UPSTREAM_HTTP].closed
    assert app[IDP_HTTP].closed
    assert jwks_task is not None
    assert jwks_task.done()
    assert app[REFRESHER].refreshing == 0
    assert app[STORE] is not None


def test_a_bearer_only_gateway_never_loads_redis_py(
    issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> None:
    # 5 MiB of memory in every sidecar process that checks bearer tokens only.
    config = base_config(issuer.url, upstream[1])
    program = (
        "import sys, json, gateway.cli, gateway.server\n"
        "from gateway.app import build_app\n"
        "from gateway.settings import parse_settings\n"
        "build_app(parse_settings(json.loads(sys.argv[1])))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", program, json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.stdout.strip() == "[]"

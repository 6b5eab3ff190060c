"""The idp package raises only its own outcomes; bff decides what the browser sees: a
discovery document that cannot be had is a 502 idp_error at login, and logout still ends
the session and sends the browser home."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.app import build_app
from gateway.settings import parse_settings


async def test_discovery_down_is_a_502_at_login_and_logout_still_works(
    aiohttp_server: Any, aiohttp_client: Any
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "down"}, status=500)

    idp = web.Application()
    idp.router.add_route("*", "/{tail:.*}", broken)
    server = await aiohttp_server(idp, host="127.0.0.1")
    issuer = str(server.make_url("")).rstrip("/")
    settings = parse_settings(
        {
            "public_url": "http://localhost:8080",
            "oidc": {"issuer": issuer, "client_id": "spa", "audience": "https://api"},
            "session": {"store": "memory", "cookie_secure": False, "cookie_name": "tg"},
            "limits": {"shutdown_delay_s": 0},
            "routes": [{"prefix": "/api", "upstream": "http://127.0.0.1:9", "auth": "session"}],
        }
    )
    client = await aiohttp_client(build_app(settings))
    login = await client.get("/auth/login", allow_redirects=False)
    assert login.status == 502
    assert (await login.json())["error"] == "idp_error"
    logout = await client.post("/auth/logout", headers={"X-CSRF": "1"})
    assert logout.status == 200
    assert (await logout.json())["logout_url"] == "http://localhost:8080/"

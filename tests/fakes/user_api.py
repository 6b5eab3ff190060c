"""A fake ``/User/Login`` + ``/User/RefreshToken`` API, the shape many in-house ASP.NET
user services have.

``POST /User/Login {"username","password"}`` answers ``{"accessToken","refreshToken"}`` (no
``expires_in``: the RS256 JWT's ``exp`` says it). ``POST /User/RefreshToken`` needs
``Version: 2.0`` (else 400) and ``Authorization: Bearer`` with the current access token of
the refresh token's family (else 401), takes ``{"refreshToken"}``, rotates both tokens and
revokes the previous access token, which the protected ``GET /User/Me`` then refuses.
The login also sets a ``refreshToken`` cookie and an ``X-Access-Token`` header, as some do.
``POST /User/Logout`` revokes the family. Refresh grants are counted here; ``down``
answers 503; ``release`` holds refresh requests until set.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.fakes.issuer import _default_key

ISSUER = "https://users.example.test"


@dataclass
class Family:
    subject: str
    access_token: str = ""  # the current one; every other is revoked
    refresh_token: str = ""
    revoked: bool = False


@dataclass
class FakeUserApi:
    users: dict[str, str] = field(default_factory=lambda: {"bob": "builder"})
    access_ttl_s: int = 300
    down: bool = False
    refresh_grants: int = 0  # successful refreshes, counted where they happen
    refresh_requests: int = 0
    logins: int = 0
    logouts: int = 0
    last_refresh_headers: dict[str, str] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a refresh request came in
    release: asyncio.Event = field(default_factory=asyncio.Event)  # clear to hold refreshes
    issued: list[str] = field(default_factory=list)  # every token handed out
    _by_access: dict[str, Family] = field(default_factory=dict)
    _by_refresh: dict[str, Family] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.release.set()

    @property
    def latest_access(self) -> str:
        return self.issued[-2]

    def revoke_all(self) -> None:
        for family in self._by_refresh.values():
            family.revoked = True

    def web_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/User/Login", self._login)
        app.router.add_post("/User/RefreshToken", self._refresh)
        app.router.add_post("/User/Logout", self._logout)
        app.router.add_get("/User/Me", self._me)
        return app

    def _current(self, request: web.Request) -> Family | None:
        """The family whose current, unrevoked access token the request carries."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        family = self._by_access.get(token)
        if family is None or family.revoked or family.access_token != token:
            return None
        return family

    async def _login(self, request: web.Request) -> web.Response:
        body = await request.json()
        username = body.get("username")
        if self.down:
            return web.json_response({"message": "maintenance"}, status=503)
        if not isinstance(username, str) or self.users.get(username) != body.get("password"):
            return web.json_response({"message": "Invalid username or password"}, status=401)
        self.logins += 1
        family = Family(subject=username)
        tokens = self._rotate(family)
        response = web.json_response({**tokens, "user": {"id": 42, "userName": username}})
        # Some such APIs also hand the browser its tokens as cookies, and echo them.
        response.set_cookie("refreshToken", tokens["refreshToken"], httponly=True)
        response.set_cookie("theme", "dark")
        response.headers["X-Access-Token"] = tokens["accessToken"]
        return response

    async def _refresh(self, request: web.Request) -> web.Response:
        self.refresh_requests += 1
        self.last_refresh_headers = dict(request.headers)
        self.arrived.set()
        await self.release.wait()
        if self.down:
            return web.json_response({"message": "maintenance"}, status=503)
        if request.headers.get("Version") != "2.0":
            return web.json_response({"message": "API version 2.0 required"}, status=400)
        body = await request.json()
        family = self._by_refresh.get(str(body.get("refreshToken")))
        if family is None or family.revoked or family.refresh_token != body["refreshToken"]:
            return web.json_response({"message": "Invalid refresh token"}, status=401)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token != family.access_token:
            return web.json_response({"message": "Access token does not match"}, status=401)
        self.refresh_grants += 1
        return web.json_response(self._rotate(family))

    async def _logout(self, request: web.Request) -> web.Response:
        family = self._current(request)
        self.logouts += 1
        if family is None:
            return web.json_response({"message": "Unauthorized"}, status=401)
        family.revoked = True
        return web.json_response({"message": "Logged out"})

    async def _me(self, request: web.Request) -> web.Response:
        family = self._current(request)
        if family is None:
            return web.json_response({"message": "Unauthorized"}, status=401)
        return web.json_response({"userName": family.subject})

    def _rotate(self, family: Family) -> dict[str, Any]:
        now = int(time.time())
        access = jwt.encode(
            {
                "iss": ISSUER,
                "sub": family.subject,
                "iat": now,
                "exp": now + self.access_ttl_s,
                "jti": uuid.uuid4().hex,
            },
            _default_key("RS256"),
            algorithm="RS256",
        )
        refresh = secrets.token_urlsafe(32)
        family.access_token, family.refresh_token = access, refresh  # the old pair is dead
        self._by_access[access] = family
        self._by_refresh[refresh] = family
        self.issued += [access, refresh]
        return {"accessToken": access, "refreshToken": refresh}

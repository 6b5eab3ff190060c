"""A fake TokenIDP-style token API: ``POST /token`` with a JSON body, replies wrapped in
``{"isSuccess": ..., "data": {...}}``.

Real RS256 JWT access tokens (JWKS at ``/.well-known/jwks.json``), opaque refresh tokens
that rotate (single use; a reused one revokes its whole family), bound to the ``clientId``
they were issued to. ``POST /logout`` revokes a family. Refresh grants are counted here,
where they arrive; ``down`` answers 503; ``release`` holds token requests until set.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.fakes.issuer import _default_key, public_jwk

KID = "tokenidp-1"
AUDIENCE = "https://api.example.test"


@dataclass
class Family:
    subject: str
    client_id: str
    revoked: bool = False


@dataclass
class RefreshRecord:
    family: Family
    used: bool = False


@dataclass
class FakeTokenIdp:
    url: str = ""  # set once it listens
    users: dict[str, str] = field(default_factory=lambda: {"alice": "wonderland"})
    clients: frozenset[str] = frozenset({"tokengate-spa", "another-app"})
    access_ttl_s: int = 300
    send_expires_in: bool = True
    rotate: bool = True
    down: bool = False
    # Counted where they arrive.
    refresh_grants: int = 0  # successful refresh_token grants
    refresh_requests: int = 0  # every refresh_token request, failed ones too
    password_grants: int = 0
    logouts: int = 0
    last_refresh_body: dict[str, Any] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a token request came in
    release: asyncio.Event = field(default_factory=asyncio.Event)  # clear to hold requests
    issued_access: list[str] = field(default_factory=list)
    issued_refresh: list[str] = field(default_factory=list)
    issued_id: list[str] = field(default_factory=list)
    _refresh: dict[str, RefreshRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.release.set()

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def issued(self) -> list[str]:
        """Every token handed out, access and refresh."""
        return self.issued_access + self.issued_refresh + self.issued_id

    @property
    def latest_access(self) -> str:
        return self.issued_access[-1]

    def revoke_all(self) -> None:
        for record in self._refresh.values():
            record.family.revoked = True

    def web_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/logout", self._logout)
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        return app

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [public_jwk(_default_key("RS256"), KID, "RS256")]})

    async def _token(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return failure(400, "INVALID_REQUEST")
        grant = body.get("grantType") if isinstance(body, dict) else None
        if grant == "refresh_token":
            self.refresh_requests += 1
            self.last_refresh_body = body
        self.arrived.set()
        await self.release.wait()
        if self.down:
            return web.json_response({"message": "maintenance"}, status=503)
        client_id = body.get("clientId")
        if client_id not in self.clients:
            return failure(401, "INVALID_CLIENT")
        if grant == "password":
            return self._password(body, client_id)
        if grant == "refresh_token":
            return self._refresh_grant(body, client_id)
        return failure(400, "UNSUPPORTED_GRANT_TYPE")

    def _password(self, body: dict[str, Any], client_id: str) -> web.Response:
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or self.users.get(username) != password:
            return failure(400, "INVALID_CREDENTIALS")
        self.password_grants += 1
        return self._issue(Family(subject=username, client_id=client_id), body.get("scope"))

    def _refresh_grant(self, body: dict[str, Any], client_id: str) -> web.Response:
        record = self._refresh.get(str(body.get("refreshToken")))
        if record is None or record.family.revoked:
            return failure(400, "INVALID_REFRESH_TOKEN")
        if record.family.client_id != client_id:
            return failure(400, "INVALID_REFRESH_TOKEN")  # bound to the client it was issued to
        if record.used:
            record.family.revoked = True  # reuse detection: the whole family dies
            return failure(400, "INVALID_REFRESH_TOKEN")
        if self.rotate:
            record.used = True
        self.refresh_grants += 1
        return self._issue(record.family, body.get("scope"), new_refresh=self.rotate)

    def _issue(self, family: Family, scope: Any, *, new_refresh: bool = True) -> web.Response:
        now = int(time.time())
        access = jwt.encode(
            {
                "iss": self.issuer,
                "sub": family.subject,
                "aud": AUDIENCE,
                "client_id": family.client_id,
                "scope": scope if isinstance(scope, str) else "api",
                "iat": now,
                "exp": now + self.access_ttl_s,
                "jti": uuid.uuid4().hex,
            },
            _default_key("RS256"),
            algorithm="RS256",
            headers={"kid": KID},
        )
        self.issued_access.append(access)
        data: dict[str, Any] = {"accessToken": access, "tokenType": "Bearer"}
        if self.send_expires_in:
            data["expiresIn"] = self.access_ttl_s
        if new_refresh:
            refresh = secrets.token_urlsafe(32)
            self._refresh[refresh] = RefreshRecord(family)
            self.issued_refresh.append(refresh)
            data["refreshToken"] = refresh
        id_token = jwt.encode(
            {"iss": self.issuer, "sub": family.subject, "aud": family.client_id, "iat": now},
            _default_key("RS256"),
            algorithm="RS256",
            headers={"kid": KID},
        )
        self.issued_id.append(id_token)
        data["idToken"] = id_token  # not configured anywhere: capture must drop it by name
        data["user"] = {"name": family.subject.title(), "roles": ["reader"]}
        return web.json_response({"isSuccess": True, "data": data})

    async def _logout(self, request: web.Request) -> web.Response:
        body = await request.json()
        record = self._refresh.get(str(body.get("refreshToken")))
        self.logouts += 1
        if record is not None:
            record.family.revoked = True
        return web.json_response({"isSuccess": True})


def failure(status: int, code: str) -> web.Response:
    return web.json_response({"isSuccess": False, "errorCode": code}, status=status)

"""The JSON refresh dialect: body templates, dotted paths, and how a custom token API's
replies map onto tokens, a dead refresh token or a transient failure.

Each dialect test talks to a scripted token API on a loopback socket that records what
reached it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.idp.json_dialect import JsonDialect, fill_template
from gateway.idp.json_paths import MISSING, remove_members, remove_path, split_path, value_at
from gateway.idp.tokens import IdpUnavailable, RefreshRejected
from gateway.metrics import Metrics
from gateway.sessions.model import Session
from gateway.settings import JsonDialectSettings

NOW = 1_700_000_000.0
VALUES = {"refresh_token": "r-1", "access_token": "a-1", "client_id": "spa", "scope": "api"}


def test_a_whole_placeholder_is_replaced_whole_and_embedded_ones_in_place() -> None:
    template = {
        "grantType": "refresh_token",
        "refreshToken": "{refresh_token}",
        "note": "client {client_id} wants {scope}",
        "nested": {"list": ["{access_token}", 3, None, True, {"{client_id}": "{client_id}"}]},
        "unknown": "{password} and {client_id}",
        "braces": '{"json": "inside"}',
    }
    assert fill_template(template, VALUES) == {
        "grantType": "refresh_token",
        "refreshToken": "r-1",
        "note": "client spa wants api",
        "nested": {"list": ["a-1", 3, None, True, {"{client_id}": "spa"}]},
        "unknown": "{password} and spa",
        "braces": '{"json": "inside"}',
    }


def test_fill_template_leaves_the_template_unchanged() -> None:
    template: dict[str, Any] = {"a": ["{scope}"]}
    fill_template(template, VALUES)
    assert template == {"a": ["{scope}"]}


def test_parse_path_walks_objects_and_array_indices() -> None:
    reply = {"isSuccess": True, "data": {"accessToken": "t", "items": [{"id": 7}], "n": None}}
    assert value_at(reply, "isSuccess") is True
    assert value_at(reply, "data.accessToken") == "t"
    assert value_at(reply, "data.items.0.id") == 7
    assert value_at(reply, "data.items.1.id") is None
    assert value_at(reply, "data.missing") is None
    assert value_at(reply, "data.accessToken.deeper") is None
    assert value_at("not an object", "data") is None
    assert value_at(reply, "data.n", MISSING) is None
    assert value_at(reply, "data.absent", MISSING) is MISSING


@pytest.mark.parametrize("bad", ["", ".", "data.", ".data", "data..accessToken"])
def test_malformed_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="dotted path"):
        split_path(bad)


def test_remove_path_copies_along_the_path_and_leaves_the_original() -> None:
    reply = {"data": {"accessToken": "t", "keep": 1}, "other": {"x": 1}, "list": [{"a": 1}]}
    stripped, removed = remove_path(reply, "data.accessToken")
    assert removed
    assert stripped == {"data": {"keep": 1}, "other": {"x": 1}, "list": [{"a": 1}]}
    assert reply["data"] == {"accessToken": "t", "keep": 1}
    assert stripped["other"] is reply["other"]  # untouched branches are shared
    stripped, removed = remove_path(reply, "list.0.a")
    assert removed
    assert stripped["list"] == [{}]
    assert reply["list"] == [{"a": 1}]
    assert remove_path(reply, "data.absent") == (reply, False)
    assert remove_path(reply, "nothing.here") == (reply, False)


def test_remove_members_drops_matching_members_at_any_depth() -> None:
    reply = {"a": 1, "token": "x", "list": [{"token": "y", "b": 2}], "obj": {"c": 3}}
    stripped, removed = remove_members(reply, lambda name, _: name == "token")
    assert removed
    assert stripped == {"a": 1, "list": [{"b": 2}], "obj": {"c": 3}}
    assert reply["token"] == "x"
    assert remove_members(reply, lambda *_: False) == (reply, False)


@dataclass
class ScriptedTokenApi:
    """Answers each request with ``reply`` (status, JSON or raw bytes); records requests."""

    reply: tuple[int, Any] = (200, {})
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    hang: asyncio.Event | None = None

    def web_app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            self.requests.append((request.method, request.path, dict(request.headers), raw))
            if self.hang is not None:
                await self.hang.wait()
            status, body = self.reply
            if isinstance(body, bytes):
                return web.Response(status=status, body=body, content_type="application/json")
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def json_body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index][3])


Make = Callable[..., Awaitable[tuple[JsonDialect, ScriptedTokenApi]]]


@pytest.fixture
async def make() -> Any:
    servers: list[TestServer] = []
    https: list[aiohttp.ClientSession] = []

    async def build(
        *, timeout_s: float = 2.0, metrics: Metrics | None = None, **settings: Any
    ) -> tuple[JsonDialect, ScriptedTokenApi]:
        api = ScriptedTokenApi()
        server = TestServer(api.web_app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        base = str(server.make_url("")).rstrip("/")
        config: dict[str, Any] = {"url": base + "/token", **settings}
        if "logout" in config:
            config["logout"] = {**config["logout"], "url": base + config["logout"]["url"]}
        http = aiohttp.ClientSession()
        https.append(http)
        dialect = JsonDialect(
            JsonDialectSettings(**config),
            "spa",
            "api offline",
            http,
            metrics or Metrics(),
            300.0,
            timeout_s=timeout_s,
            clock=lambda: NOW,
        )
        return dialect, api

    yield build
    for http in https:
        await http.close()
    for server in servers:
        await server.close()


def session(**changes: Any) -> Session:
    values: dict[str, Any] = {
        "subject": "alice",
        "access_token": "old-access",
        "access_expires_at": NOW - 1,
        "refresh_token": "old-refresh",
    }
    return Session(**{**values, **changes})


TOKENIDP = {
    "headers": {"X-Api": "1"},
    "body": {
        "grantType": "refresh_token",
        "clientId": "{client_id}",
        "refreshToken": "{refresh_token}",
        "scope": "{scope}",
    },
    "response": {
        "access_token": "data.accessToken",
        "refresh_token": "data.refreshToken",
        "expires_in": "data.expiresIn",
        "token_type": "data.tokenType",
        "success": "isSuccess",
    },
    "dead_token_path": "errorCode",
    "dead_token_values": ["INVALID_REFRESH_TOKEN"],
}


async def test_tokenidp_shape_sends_the_template_and_maps_the_reply(make: Make) -> None:
    dialect, api = await make(**TOKENIDP)
    api.reply = (
        200,
        {
            "isSuccess": True,
            "data": {
                "accessToken": "new-access",
                "refreshToken": "new-refresh",
                "tokenType": "Bearer",
                "expiresIn": 3600,
            },
        },
    )
    tokens = await dialect.refresh(session())
    assert tokens.access_token == "new-access"
    assert tokens.refresh_token == "new-refresh"
    assert tokens.expires_at == NOW + 3600
    assert tokens.token_type == "Bearer"
    method, path, headers, _ = api.requests[0]
    assert (method, path) == ("POST", "/token")
    assert headers["X-Api"] == "1"
    assert headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers  # send_access_token is off
    assert api.json_body() == {
        "grantType": "refresh_token",
        "clientId": "spa",
        "refreshToken": "old-refresh",
        "scope": "api offline",
    }


def expiring_jwt(exp: Any) -> str:
    return jwt.encode({"exp": exp}, "k" * 32, algorithm="HS256")


async def test_tokenidp_shape_expires_at_the_jwt_exp_before_its_expires_in(make: Make) -> None:
    dialect, api = await make(**TOKENIDP)
    access = expiring_jwt(int(NOW) + 900)
    api.reply = (200, {"isSuccess": True, "data": {"accessToken": access, "expiresIn": 3600}})
    assert (await dialect.refresh(session())).expires_at == NOW + 900


async def test_user_api_shape_sends_the_current_access_token_and_version(make: Make) -> None:
    dialect, api = await make(
        headers={"Version": "2.0"},
        send_access_token=True,
        body={"refreshToken": "{refresh_token}"},
        response={"access_token": "accessToken", "refresh_token": "refreshToken"},
    )
    access = jwt.encode({"sub": "bob", "exp": int(NOW) + 900}, "k" * 32, algorithm="HS256")
    api.reply = (200, {"accessToken": access, "refreshToken": "r-2"})
    tokens = await dialect.refresh(session())
    _, _, headers, _ = api.requests[0]
    assert headers["Authorization"] == "Bearer old-access"
    assert headers["Version"] == "2.0"
    assert api.json_body() == {"refreshToken": "old-refresh"}
    assert tokens.expires_at == NOW + 900  # no expires_in: the JWT's exp


@pytest.mark.parametrize(
    ("expires_in", "access_token", "expected"),
    [
        (120, "opaque", NOW + 120),
        ("120", "opaque", NOW + 120),
        (None, expiring_jwt(int(NOW) + 42), NOW + 42),
        (3600, expiring_jwt(int(NOW) + 42), NOW + 42),  # the JWT ends first
        (60, expiring_jwt(int(NOW) + 3600), NOW + 60),  # expires_in ends first
        (120, expiring_jwt("1999999999"), NOW + 120),  # not a NumericDate: ignored
        (None, expiring_jwt("1999999999"), NOW + 300),
        (None, "opaque", NOW + 300),  # default_lifetime_s
        (-5, "opaque", NOW + 300),
        ("0", "opaque", NOW + 300),
        ("²", "opaque", NOW + 300),  # a digit to str.isdigit(), not to float()
    ],
)
async def test_expiry_is_the_earliest_of_expires_in_and_the_jwt_else_the_default(
    make: Make, expires_in: Any, access_token: str, expected: float
) -> None:
    dialect, api = await make(response={"access_token": "at", "expires_in": "exp_in"})
    reply: dict[str, Any] = {"at": access_token}
    if expires_in is not None:
        reply["exp_in"] = expires_in
    api.reply = (200, reply)
    assert (await dialect.refresh(session())).expires_at == expected


async def test_a_reply_without_a_refresh_token_keeps_the_old_one(make: Make) -> None:
    dialect, api = await make(response={"access_token": "at", "refresh_token": "rt"})
    api.reply = (200, {"at": "new-access"})
    tokens = await dialect.refresh(session())
    assert tokens.refresh_token is None
    updated = session().with_tokens(
        access_token=tokens.access_token,
        access_expires_at=tokens.expires_at,
        refresh_token=tokens.refresh_token,
        id_token=None,
    )
    assert updated.refresh_token == "old-refresh"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"isSuccess": False, "errorCode": "INVALID_REFRESH_TOKEN"}),
        (200, {"isSuccess": False, "errorCode": "INVALID_REFRESH_TOKEN"}),
        (401, {"message": "nope"}),
        (403, b"<html>forbidden</html>"),
    ],
)
async def test_dead_token_replies_raise_refresh_rejected(
    make: Make, status: int, body: Any
) -> None:
    dialect, api = await make(**TOKENIDP)
    api.reply = (status, body)
    with pytest.raises(RefreshRejected):
        await dialect.refresh(session())


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"isSuccess": False, "errorCode": "SERVICE_BUSY"}),  # no dead marker
        (200, {"isSuccess": False}),
        (200, {"isSuccess": True, "data": {}}),  # success without a token
        (200, {"isSuccess": "true", "data": {"accessToken": "x"}}),  # not == success_value
        (200, b"{not json"),
        (500, {"isSuccess": False, "errorCode": "INTERNAL"}),
        (503, b"maintenance"),
        (302, {}),
    ],
)
async def test_other_failures_raise_idp_unavailable(make: Make, status: int, body: Any) -> None:
    dialect, api = await make(**TOKENIDP)
    api.reply = (status, body)
    with pytest.raises(IdpUnavailable):
        await dialect.refresh(session())


async def test_dead_statuses_can_be_narrowed_to_the_dead_marker(make: Make) -> None:
    dialect, api = await make(**{**TOKENIDP, "dead_token_statuses": []})
    api.reply = (400, {"isSuccess": False, "errorCode": "INVALID_CLIENT"})
    with pytest.raises(IdpUnavailable):
        await dialect.refresh(session())
    api.reply = (400, {"isSuccess": False, "errorCode": "INVALID_REFRESH_TOKEN"})
    with pytest.raises(RefreshRejected):
        await dialect.refresh(session())


async def test_without_a_success_path_any_2xx_with_a_token_is_success(make: Make) -> None:
    dialect, api = await make(response={"access_token": "token"})
    api.reply = (201, {"token": "t"})
    assert (await dialect.refresh(session())).access_token == "t"


async def test_a_reply_over_the_size_limit_is_unavailable(make: Make) -> None:
    dialect, api = await make(response={"access_token": "at"})
    api.reply = (200, b'{"at": "' + b"x" * (1024 * 1024) + b'"}')
    with pytest.raises(IdpUnavailable):
        await dialect.refresh(session())


async def test_a_hanging_api_times_out_as_unavailable(make: Make) -> None:
    dialect, api = await make(timeout_s=0.2, response={"access_token": "at"})
    api.hang = asyncio.Event()
    with pytest.raises(IdpUnavailable):
        await dialect.refresh(session())
    api.hang.set()


async def test_an_unreachable_api_is_unavailable_and_the_call_is_timed() -> None:
    metrics = Metrics()
    settings = JsonDialectSettings(url="http://127.0.0.1:1/token")
    async with aiohttp.ClientSession() as http:
        closed = JsonDialect(settings, "spa", "", http, metrics, 300.0)
        with pytest.raises(IdpUnavailable):
            await closed.refresh(session())
    count = metrics.registry.get_sample_value(
        "tokengate_idp_request_duration_seconds_count", {"call": "refresh"}
    )
    assert count == 1


async def test_a_session_without_a_refresh_token_is_rejected_without_a_call(make: Make) -> None:
    dialect, api = await make()
    with pytest.raises(RefreshRejected):
        await dialect.refresh(session(refresh_token=None))
    assert api.requests == []


async def test_a_get_call_sends_no_body_unless_templated(make: Make) -> None:
    dialect, api = await make(method="GET", send_access_token=True)
    api.reply = (200, {"access_token": "t"})
    await dialect.refresh(session())
    method, _, headers, raw = api.requests[0]
    assert (method, raw) == ("GET", b"")
    assert headers["Authorization"] == "Bearer old-access"


async def test_logout_calls_the_configured_api_best_effort(make: Make) -> None:
    dialect, api = await make(
        logout={
            "url": "/User/Logout",
            "send_access_token": True,
            "body": {"refreshToken": "{refresh_token}"},
        }
    )
    api.reply = (200, {})
    assert await dialect.logout(session()) is True
    method, path, headers, _ = api.requests[0]
    assert (method, path) == ("POST", "/User/Logout")
    assert headers["Authorization"] == "Bearer old-access"
    assert api.json_body() == {"refreshToken": "old-refresh"}
    api.reply = (500, {})
    assert await dialect.logout(session()) is False


async def test_logout_without_configuration_or_reachable_api_is_false(make: Make) -> None:
    dialect, api = await make()
    assert await dialect.logout(session()) is False
    assert api.requests == []
    settings = JsonDialectSettings(
        url="http://127.0.0.1:1/token", logout={"url": "http://127.0.0.1:1/logout"}
    )
    async with aiohttp.ClientSession() as http:
        unreachable = JsonDialect(settings, "spa", "", http, Metrics(), 300.0)
        assert await unreachable.logout(session()) is False


def test_a_malformed_response_path_fails_at_construction() -> None:
    settings = JsonDialectSettings(
        url="https://idp.example.test/token", response={"access_token": "data..accessToken"}
    )
    with pytest.raises(ValueError, match="dotted path"):
        JsonDialect(settings, "spa", "", None, Metrics(), 300.0)  # type: ignore[arg-type]

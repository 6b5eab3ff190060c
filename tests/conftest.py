"""Fixtures shared by every test: the fake issuer and upstream, settings, the gateway."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from gateway.app import build_app
from gateway.settings import Settings, parse_settings
from tests.fakes.issuer import AUDIENCE, FakeIssuer
from tests.fakes.upstream import FakeUpstream
from tests.support.otlp import OtlpReceiver

# Generated inputs: a fixed budget per property so `make test` stays fast on 2 cores, no
# per-example deadline (a loaded CI machine is slow, not wrong); `make fuzz` raises it.
hypothesis_settings.register_profile(
    "default",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
hypothesis_settings.register_profile(
    "fuzz", parent=hypothesis_settings.get_profile("default"), max_examples=5000
)
hypothesis_settings.load_profile(os.environ.get("TOKENGATE_HYPOTHESIS_PROFILE", "default"))

AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def issuer(aiohttp_server: AiohttpServer) -> FakeIssuer:
    fake = FakeIssuer()
    server = await aiohttp_server(fake.web_app(), host="127.0.0.1")
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> tuple[FakeUpstream, str]:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.web_app(), host="127.0.0.1")
    return fake, str(server.make_url("")).rstrip("/")


def base_config(issuer_url: str, upstream_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "public_url": "http://localhost:8080",
        "oidc": {
            "issuer": issuer_url,
            "audience": AUDIENCE,
            "jwks_refetch_interval_s": 30,
        },
        "limits": {"max_body_bytes": 1024 * 1024, "shutdown_delay_s": 0},
        "log": {"access_log": True},
        "routes": [
            {"prefix": "/public", "upstream": upstream_url, "auth": "none"},
            {"prefix": "/api", "upstream": upstream_url, "auth": "bearer", "scopes": ["api.read"]},
            {
                "prefix": "/api/admin",
                "upstream": upstream_url,
                "auth": "bearer",
                "scopes": ["api.admin"],
            },
            {
                "prefix": "/strip",
                "upstream": upstream_url + "/base",
                "auth": "none",
                "strip_prefix": True,
            },
            {"prefix": "/ws", "upstream": upstream_url, "auth": "bearer", "websocket": True},
            {
                "prefix": "/big",
                "upstream": upstream_url,
                "auth": "none",
                "max_body_bytes": 2 * 1024**3,
            },
            {
                "prefix": "/slow",
                "upstream": upstream_url,
                "auth": "none",
                "read_timeout_s": 0.5,
            },
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    """An OTLP/HTTP trace receiver; fixtures that depend on it close their gateways (and
    so flush their spans) before it stops."""
    otlp = await OtlpReceiver().start()
    yield otlp
    await otlp.close()


@pytest.fixture
def settings(issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]) -> Settings:
    return parse_settings(base_config(issuer.url, upstream[1]))


@pytest.fixture
async def gateway(aiohttp_client: AiohttpClient, settings: Settings) -> TestClient[Any, Any]:
    return await aiohttp_client(build_app(settings))

"""Builds the public application and owns every shared resource's life.

Each resource is made by an ``app.cleanup_ctx`` function named after what it provides,
published under a typed ``web.AppKey`` and closed after ``yield``; aiohttp runs the
cleanups in reverse order, so the proxy goes before the keys it uses and the keys before
the HTTP sessions they fetch with. Serving (sockets, signals, workers) is ``server``'s job.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.admin import Readiness
from gateway.auth import Authenticator
from gateway.idp.discovery import Discovery
from gateway.ingress import Ingress, aiohttp_parser_limits, set_request_id_header
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.routing import RouteTable
from gateway.settings import Settings
from gateway.tokens.jwks import JwksCache
from gateway.tokens.validator import TokenValidator
from gateway.upstream import Upstream

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
READINESS = web.AppKey("readiness", Readiness)
UPSTREAM_HTTP = web.AppKey("upstream_http", aiohttp.ClientSession)
IDP_HTTP = web.AppKey("idp_http", aiohttp.ClientSession)
DISCOVERY = web.AppKey("discovery", Discovery)
JWKS = web.AppKey("jwks", JwksCache)
VALIDATOR = web.AppKey("validator", TokenValidator)
PROXY = web.AppKey("proxy", Proxy)

_UPSTREAM_POOL_LIMIT = 1024
_UPSTREAM_KEEPALIVE_S = 30.0


async def upstream_http(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession per process for every upstream."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=_UPSTREAM_POOL_LIMIT, keepalive_timeout=_UPSTREAM_KEEPALIVE_S
        ),
        # SECURITY: a shared jar would replay one user's upstream cookies for the next.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )
    app[UPSTREAM_HTTP] = session
    yield
    await session.close()


async def idp_http(app: web.Application) -> AsyncIterator[None]:
    """A separate small pool for the identity provider, so upstream load cannot starve it."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    app[IDP_HTTP] = session
    yield
    await session.close()


async def token_keys(app: web.Application) -> AsyncIterator[None]:
    """Discovery, the JWKS cache with its refresh task, and the validator built on them."""
    settings = app[SETTINGS]
    if not (settings.oidc.issuer or settings.oidc.jwks_uri):
        yield
        return
    discovery = Discovery(settings.oidc, app[IDP_HTTP])
    jwks = JwksCache(settings.oidc, discovery, app[IDP_HTTP], app[METRICS])
    app[DISCOVERY] = discovery
    app[JWKS] = jwks
    app[VALIDATOR] = TokenValidator(settings.oidc, jwks, app[METRICS])

    async def keys_loaded() -> bool:
        return jwks.ready

    app[READINESS].add_check("keys", keys_loaded)
    jwks.start()
    yield
    app[READINESS].remove_check("keys")
    await jwks.aclose()


async def proxy(app: web.Application) -> AsyncIterator[None]:
    """The route table, the authenticator and the forwarder, wired in request order."""
    settings = app[SETTINGS]
    upstream = Upstream(
        app[UPSTREAM_HTTP],
        app[METRICS],
        max_body_bytes=settings.limits.max_body_bytes,
        session_cookie=settings.session.cookie_name if settings.uses_sessions else None,
    )
    auth = Authenticator(app.get(VALIDATOR))
    app[PROXY] = Proxy(RouteTable.build(settings.routes), auth, upstream)
    yield


async def handle(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


def build_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    readiness: Readiness | None = None,
) -> web.Application:
    metrics = metrics or Metrics()
    ingress = Ingress(settings.limits, settings.log, metrics)
    app = web.Application(
        middlewares=[ingress.middleware],
        handler_args=aiohttp_parser_limits(settings.limits),
        client_max_size=settings.limits.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[READINESS] = readiness or Readiness()
    app.cleanup_ctx.extend((upstream_http, idp_http, token_keys, proxy))
    app.on_response_prepare.append(set_request_id_header)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app

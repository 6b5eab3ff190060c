"""Builds the public application and owns every shared resource's life.

Each resource is made by an ``app.cleanup_ctx`` function named after what it provides,
published under a typed ``web.AppKey`` and closed after ``yield``; aiohttp runs the
cleanups in reverse order, so the proxy goes before the keys it uses and the keys before
the HTTP sessions they fetch with. Serving (sockets, signals, workers) is ``server``'s job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway import __version__
from gateway.admin import Readiness
from gateway.auth import Authenticator
from gateway.bff.capture import TokenCapture
from gateway.bff.login import LoginEndpoints
from gateway.bff.logout import BackchannelLogout, Logout, SessionInfo
from gateway.errors import MethodNotAllowedError, NotFoundError
from gateway.http1 import Http1Pool
from gateway.idp.discovery import Discovery
from gateway.idp.json_dialect import build_json_dialect
from gateway.idp.oauth2 import OAuth2Client
from gateway.ingress import (
    Handler,
    Ingress,
    aiohttp_parser_limits,
    expect_continue,
)
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.routing import RouteTable, parse_path
from gateway.sessions.authenticator import SessionAuthenticator
from gateway.sessions.cookie import SessionCookies
from gateway.sessions.memory_store import MemorySessionStore
from gateway.sessions.model import SessionStore
from gateway.sessions.refresh import Refresher
from gateway.settings import OIDC_PROVIDER, Settings
from gateway.tokens.dpop import DpopVerifier
from gateway.tokens.providers import TokenProviders, build_providers
from gateway.tokens.shared import MemoryTokenState, RedisTokenState, TokenState
from gateway.tokens.validator import TokenValidator
from gateway.tracing import Tracing
from gateway.upstream import Upstream

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
Clock = Callable[[], float]
CLOCK: web.AppKey[Clock] = web.AppKey("clock")  # wall clock; tests move it forward
METRICS = web.AppKey("metrics", Metrics)
READINESS = web.AppKey("readiness", Readiness)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
TRACING = web.AppKey("tracing", Tracing)
UPSTREAM_HTTP = web.AppKey("upstream_http", aiohttp.ClientSession)
UPSTREAM_POOL = web.AppKey("upstream_pool", Http1Pool)
IDP_HTTP = web.AppKey("idp_http", aiohttp.ClientSession)
DISCOVERY = web.AppKey("discovery", Discovery)
PROVIDERS = web.AppKey("providers", TokenProviders)
VALIDATOR = web.AppKey("validator", TokenValidator)  # the oidc provider's, for ID tokens
DPOP = web.AppKey("dpop", DpopVerifier)
STORE: web.AppKey[SessionStore] = web.AppKey("session_store")
REFRESHER = web.AppKey("refresher", Refresher)
SESSIONS = web.AppKey("session_authenticator", SessionAuthenticator)
LOGIN = web.AppKey("login", LoginEndpoints)
SESSION_INFO = web.AppKey("session_info", SessionInfo)
LOGOUT = web.AppKey("logout", Logout)
BACKCHANNEL_LOGOUT = web.AppKey("backchannel_logout", BackchannelLogout)
CAPTURE = web.AppKey("capture", TokenCapture)
PROXY = web.AppKey("proxy", Proxy)
# The public app's handler as the server calls it, bypassing aiohttp's router.
ENTRY: web.AppKey[Handler] = web.AppKey("entry")


async def metrics_flush(app: web.Application) -> AsyncIterator[None]:
    """Counts folded into the registry every second (``Metrics.flush``), and at the end."""
    app[METRICS].start_flushing()
    yield
    app[METRICS].stop_flushing()


async def access_log(app: web.Application) -> AsyncIterator[None]:
    """The access log's batch: whatever is still pending is written on the way out."""
    yield
    app[ACCESS_LOG].close()


async def traces(app: web.Application) -> AsyncIterator[None]:
    """Spans recorded from here on (with an exporter); what is buffered is exported within
    the drain grace on the way out, after every request that could add to it."""
    tracing = app[TRACING]
    tracing.open()
    yield
    await tracing.aclose(app[SETTINGS].limits.shutdown_grace_s)


async def upstream_http(app: web.Application) -> AsyncIterator[None]:
    """Per process: the HTTP/1.1 pool for plain-http upstreams, and one pooled
    ClientSession for https upstreams and WebSockets."""
    settings = app[SETTINGS].upstream
    pool = None
    if settings.client == "http1":
        pool = Http1Pool(limit_per_host=settings.pool_size, idle_timeout_s=settings.idle_timeout_s)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit_per_host=settings.pool_size, limit=0, keepalive_timeout=settings.idle_timeout_s
        ),
        # SECURITY: a shared jar would replay one user's upstream cookies for the next.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )
    app[UPSTREAM_HTTP] = session
    if pool is not None:
        app[UPSTREAM_POOL] = pool
    yield
    await session.close()
    if pool is not None:
        await pool.aclose()


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
    """The trusted providers (discovery, key sets with their refresh tasks, validators,
    introspection), the state DPoP and introspection keep, and the DPoP verifier."""
    settings = app[SETTINGS]
    if not settings.token_providers:
        yield
        return
    state = _token_state(settings)
    providers = build_providers(
        settings.token_providers,
        app[IDP_HTTP],
        app[METRICS],
        shared=state,
        clock=app[CLOCK],
        tracer=app[TRACING].tracer,
    )
    app[PROVIDERS] = providers
    oidc = providers.get(OIDC_PROVIDER)
    if oidc is not None and oidc.validator is not None:
        app[VALIDATOR] = oidc.validator  # ID and logout tokens (login, back-channel logout)
        if oidc.discovery is not None:
            app[DISCOVERY] = oidc.discovery
    app[DPOP] = DpopVerifier(settings.dpop, state, app[METRICS], clock=app[CLOCK])

    async def keys_loaded() -> bool:
        return providers.ready

    app[READINESS].add_check("keys", keys_loaded)
    providers.start()
    yield
    app[READINESS].remove_check("keys")
    await providers.aclose()
    await state.aclose()


def _token_state(settings: Settings) -> TokenState:
    """Redis when DPoP's replay cache or an introspection cache is to be shared, else this
    process's memory. Its own client: the session store's calls keep their deadlines."""
    if not settings.shares_token_state:
        return MemoryTokenState()
    from gateway.sessions.redis_store import build_redis  # see session_store

    return RedisTokenState(build_redis(settings.session), settings.session.key_prefix)


async def session_store(app: web.Application) -> AsyncIterator[None]:
    """The session store (Redis pool, or memory for one replica), when a route needs it."""
    settings = app[SETTINGS]
    if not settings.uses_sessions:
        yield
        return
    store: SessionStore
    if settings.session.store == "memory":
        store = MemorySessionStore(settings.session, clock=app[CLOCK])
        log.warning("memory_session_store", extra={"note": "one replica only; lost on restart"})
    else:
        # Imported here: redis-py is 5 MiB of every process's memory, and a sidecar that
        # only checks bearer tokens never needs it.
        from gateway.sessions.redis_store import RedisSessionStore, build_redis

        redis_store = RedisSessionStore(
            settings.session,
            build_redis(settings.session),
            app[METRICS],
            clock=app[CLOCK],
            tracer=app[TRACING].tracer,
        )
        redis_store.start()  # follows invalidations for its local cache; aclose stops it
        store = redis_store
    if not settings.session.cookie_secure:
        log.warning("insecure_cookie", extra={"note": "Secure is off: http://localhost only"})
    app[STORE] = store
    app[READINESS].add_check("session_store", store.ping)
    yield
    app[READINESS].remove_check("session_store")
    await store.aclose()


async def sessions(app: web.Application) -> AsyncIterator[None]:
    """Refresh, session authentication and the /auth/ endpoints, built on the store."""
    settings = app[SETTINGS]
    if STORE not in app:
        yield
        return
    store, metrics, refresh = app[STORE], app[METRICS], settings.refresh
    # Without oidc.issuer (capture-only) discovery is never loaded unless oauth2 needs it.
    discovery = app.get(DISCOVERY) or Discovery(settings.oidc, app[IDP_HTTP])
    oauth = OAuth2Client(
        settings.oidc, refresh, discovery, app[IDP_HTTP], metrics, tracer=app[TRACING].tracer
    )
    json_api = build_json_dialect(
        refresh, settings.oidc.client_id, app[IDP_HTTP], metrics, clock=app[CLOCK]
    )
    dialect = oauth if json_api is None else json_api
    refresher = Refresher(
        store, dialect, refresh, metrics, clock=app[CLOCK], tracer=app[TRACING].tracer
    )
    cookies = SessionCookies(settings.session)
    authenticator = SessionAuthenticator(
        cookies,
        store,
        refresher,
        settings.csrf,
        settings.public_url,
        principals_kept=settings.session.local_cache_size,
        absolute_timeout_s=settings.session.absolute_timeout_s,
        clock=app[CLOCK],
    )
    app[REFRESHER] = refresher
    app[SESSIONS] = authenticator
    validator = app.get(VALIDATOR)
    if settings.uses_oidc_login and validator is not None:
        app[LOGIN] = LoginEndpoints(
            settings.oidc,
            discovery,
            oauth,
            validator,
            store,
            cookies,
            metrics,
            app[CLOCK],
            redirect_uri=settings.redirect_uri,
            login_timeout_s=settings.session.login_timeout_s,
        )
    app[SESSION_INFO] = SessionInfo(authenticator, cookies, settings.session.absolute_timeout_s)
    app[LOGOUT] = Logout(
        authenticator,
        store,
        cookies,
        discovery,
        oauth,
        metrics,
        client_id=settings.oidc.client_id,
        after_logout_url=settings.oidc.post_logout_redirect_uri or f"{settings.public_url}/",
        end_grant=None if json_api is None else json_api.logout,
    )
    app[BACKCHANNEL_LOGOUT] = BackchannelLogout(
        validator, store, metrics, client_id=settings.oidc.client_id, clock=app[CLOCK]
    )
    app[CAPTURE] = TokenCapture(
        store,
        cookies,
        refresh.default_lifetime_s,
        metrics,
        app[CLOCK],
        check_csrf=authenticator.check_csrf,
    )
    yield
    await refresher.aclose()


async def proxy(app: web.Application) -> AsyncIterator[None]:
    """The route table, the authenticator and the forwarder, wired in request order."""
    settings = app[SETTINGS]
    upstream = Upstream(
        app[UPSTREAM_HTTP],
        app.get(UPSTREAM_POOL),
        app[METRICS],
        max_body_bytes=settings.limits.max_body_bytes,
        public_url=settings.public_url,
        trusted_proxies=settings.forwarded.trusted_networks,
        own_cookies=frozenset(
            (settings.session.cookie_name, settings.session.login_cookie_name)
            if settings.uses_sessions
            else ()
        ),
        dpop_upstream=settings.dpop.upstream,
        thumbprint_header=settings.dpop.thumbprint_header,
        tracing=app[TRACING],
    )
    auth = Authenticator(
        app.get(PROVIDERS),
        app.get(SESSIONS),
        dpop=app.get(DPOP),
        public_url=settings.public_url,
        clock=app[CLOCK],
    )
    app[PROXY] = Proxy(
        RouteTable.build(settings.routes),
        auth,
        upstream,
        app.get(CAPTURE),
    )
    yield


class PublicRoutes:
    """Which handler a public request goes to, by its normalised path (``routing.parse_path``,
    the one reading of a target the proxy routes by too): ``/auth/`` is ours (the session
    endpoints; a wrong method there is 405, an unknown path 404, never a route's), every
    other path is ``proxy``'s. One handler behind the ingress instead of aiohttp's router:
    resolving a route in aiohttp costs more than this, and the proxy needs the path parsed
    anyway. Handlers are looked up in ``app`` when called: they are made at startup."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        self._app = app
        self._proxy: Proxy | None = None
        self._sessions = settings.uses_sessions
        self._auth: dict[str, dict[str, Handler]] = {}
        if self._sessions:
            self._add_auth_routes(settings.uses_oidc_login)

    def _add_auth_routes(self, oidc_login: bool) -> None:
        app = self._app

        async def login(request: web.Request) -> web.StreamResponse:
            return await app[LOGIN].login(request)

        async def callback(request: web.Request) -> web.StreamResponse:
            return await app[LOGIN].callback(request)

        async def session_info(request: web.Request) -> web.StreamResponse:
            return await app[SESSION_INFO].session_info(request)

        async def logout(request: web.Request) -> web.StreamResponse:
            return await app[LOGOUT].logout(request)

        async def backchannel_logout(request: web.Request) -> web.StreamResponse:
            return await app[BACKCHANNEL_LOGOUT].backchannel_logout(request)

        get = ("GET", "HEAD")  # as aiohttp's add_get
        self._add("/auth/session", get, session_info)
        self._add("/auth/logout", ("POST",), logout)
        if oidc_login:  # capture-only deployments log in through their capture route
            self._add("/auth/login", get, login)
            self._add("/auth/callback", get, callback)
            self._add("/auth/backchannel-logout", ("POST",), backchannel_logout)

    def _add(self, path: str, methods: tuple[str, ...], handler: Handler) -> None:
        self._auth[path] = dict.fromkeys(methods, handler)

    def __call__(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        # Not a coroutine itself: it hands over the handler's, one frame fewer for each
        # resumption of the request. Its errors are raised where the ingress awaits.
        path = parse_path(request.raw_path.partition("?")[0])
        if request.method == "CONNECT":
            # SECURITY: a tunnel (RFC 9110 §9.3.6) is no request for a reverse proxy. A 2xx
            # from an upstream that takes it would make its pooled connection a tunnel, and
            # the next request sent on it someone else's bytes in it.
            raise MethodNotAllowedError()
        if not path.startswith("/auth/"):
            proxy = self._proxy
            if proxy is None:  # made at startup, after this
                proxy = self._proxy = self._app[PROXY]
            return proxy.handle(request, path)
        handlers = self._auth.get(path)
        if handlers is not None:
            handler = handlers.get(request.method)
            if handler is not None:
                return handler(request)
            raise MethodNotAllowedError()
        if path in _AUTH_PATHS and self._sessions:
            raise MethodNotAllowedError()  # an endpoint this deployment does not serve
        raise NotFoundError()


_AUTH_PATHS = frozenset(
    {"/auth/login", "/auth/callback", "/auth/session", "/auth/logout", "/auth/backchannel-logout"}
)


def build_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    readiness: Readiness | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    metrics = metrics or Metrics()
    access = AccessLog(settings.log)
    tracing = Tracing(settings.tracing, service_version=__version__)
    ingress = Ingress(settings.limits, settings.log, metrics, access, tracing)
    app = web.Application(
        handler_args=aiohttp_parser_limits(settings.limits),
        client_max_size=settings.limits.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[METRICS] = metrics
    app[READINESS] = readiness or Readiness()
    app[ACCESS_LOG] = access
    app[TRACING] = tracing
    app.cleanup_ctx.extend(
        (
            metrics_flush,
            access_log,
            traces,
            upstream_http,
            idp_http,
            token_keys,
            session_store,
            sessions,
            proxy,
        )
    )
    # One handler behind the ingress for every request. It is the only route, matching
    # every target, so aiohttp's router never answers by itself (no 404 or 405 of its own);
    # the server calls it directly (``ENTRY``), without the router.
    routes = PublicRoutes(app, settings)
    app[ENTRY] = ingress.wrap(routes, expect=True)
    every_target = AnyTarget()
    app.router.register_resource(every_target)
    every_target.add_route("*", ingress.wrap(routes), expect_handler=expect_continue)
    return app


class AnyTarget(web.PlainResource):
    """The last resource: it matches every request target, also those no path pattern can
    (``OPTIONS *``, ``CONNECT host:443``, a path with an encoded line feed), so aiohttp's
    router never answers by itself; ``proxy`` judges the target (400 for these)."""

    def __init__(self) -> None:
        super().__init__("/")  # indexed under "/", where aiohttp's lookup of any path ends

    def _match(self, path: str) -> dict[str, str] | None:
        return {}

    def raw_match(self, path: str) -> bool:
        return True

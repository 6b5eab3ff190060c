"""What the benchmark measures: the table of targets and the tokengate config they run.

A target is a server to start (``kind``), a path on it and the credentials wrk sends
(``client``). Adding a tokengate mode is adding a row here, a route in
:func:`tokengate_config` and, when the client needs fixtures, a branch in ``servers.py``'s
``Lab.client_args`` (and ``Lab.probe``).

Each ``tg-*`` row has a floor sent the same request (``floor=``): ``floor-bearer``,
``floor-introspect`` and ``floor-dpop`` forward the headers they get as they are, without
checking them, so **x floor, same request** leaves what checking costs.

Sessions (``tg-session``, ``tg-refresh-storm``) live in a real ``redis-server`` started by
the driver; :func:`session_settings` is the one ``session:`` section both tokengate and the
driver's seeding (``seed.py``, through gateway's own store) read, so the keys, the cookie
and the timeouts agree. ``tg-refresh-storm`` is no wrk target (``wrk=False``): ``run.py``
runs it as its own section (``storm.py``).

``floor-http1`` is ``floor`` on tokengate's upstream client (``floor_client="http1"``,
``floor.py --client http1``): every row is also reported against it (**x floor-http1**).

Traces (``tracing=``): ``default`` is tokengate's own (W3C trace context propagated, no
SDK), ``off`` is ``tracing.propagate: false`` (no trace ids at all), ``sdk`` records every
span (``sample_ratio: 1.0``) and exports it over OTLP/HTTP to the bench's sink
(``otlp_sink.py``, the ``otlp`` fixture). ``tg-bearer-trace-off``, ``tg-bearer-warm`` and
``tg-bearer-trace-sdk`` are the same request to the same route under the three settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from issuer import AUDIENCE, CLIENT_ID, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET

Kind = Literal["origin", "nginx", "floor", "tokengate"]
Client = Literal[
    "plain", "bearer-warm", "bearer-cold", "introspect-warm", "dpop", "session", "refresh-storm"
]
# The floor's upstream client (floor.py --client): aiohttp's, or tokengate's gateway.http1.
FloorClient = Literal["aiohttp", "http1", "static", "raw"]
# Traces: tokengate's default (propagation only), none at all, or every span exported.
Tracing = Literal["default", "off", "sdk"]
# Introspection answers kept this long (tokengate's maximum): one call per instance, the
# whole run a cache hit. The issuer's answers say exp = an hour after the call.
INTROSPECTION_CACHE_TTL_S = 3600


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: Kind
    client: Client = "plain"
    path: str = ""  # prefix before /<body> on this server
    workers: int = 1
    # fixtures: "issuer", "redis", "otlp" (the trace sink)
    needs: frozenset[str] = field(default_factory=frozenset)
    tracing: Tracing = "default"  # tokengate only
    floor_client: FloorClient = "aiohttp"  # floor only: floor.py --client
    # The floor sent this target's request: the same-request ratio's reference.
    floor: str = "floor"
    ready: bool = True  # False: listed, skipped with ``note``
    wrk: bool = True  # False: measured in its own section, not by a wrk run
    note: str = ""

    @property
    def is_tokengate(self) -> bool:
        return self.kind == "tokengate"


ISSUER = frozenset({"issuer"})
TARGETS: tuple[Target, ...] = (
    Target("origin", "origin", note="wrk straight to the origin (latency baseline)"),
    Target("nginx", "nginx", note="nginx proxy_pass, 1 worker: the limit"),
    Target("floor", "floor", note="bare aiohttp pass-through: the floor"),
    Target(
        "floor-http1",
        "floor",
        floor_client="http1",
        note="the floor's pass-through with tokengate's own upstream client (gateway.http1's "
        "Http1Pool, raw header bytes through) instead of aiohttp's: the floor on tokengate's "
        "client and server; every row is also given as x floor-http1",
    ),
    Target(
        "aio-static",
        "floor",
        floor_client="static",
        note="aiohttp's server alone (floor.py --client static): the bodies answered from "
        "memory, no upstream; what any aiohttp server pays per request before it proxies",
    ),
    Target(
        "raw-static",
        "floor",
        floor_client="raw",
        note="the same bodies from a bare httptools parser on uvloop (floor.py --client raw): "
        "no aiohttp, no limits, no request object; aio-static less this is aiohttp's own share",
    ),
    Target(
        "floor-bearer",
        "floor",
        "bearer-warm",
        needs=ISSUER,
        floor="floor-bearer",
        note="the floor sent the bearer targets' Authorization header (it forwards it as is)",
    ),
    Target("tg-none", "tokengate", path="/none", note="auth: none"),
    Target(
        "tg-bearer-warm",
        "tokengate",
        "bearer-warm",
        "/bearer",
        needs=ISSUER,
        floor="floor-bearer",
        note="one valid RS256 token, verified-token cache hit",
    ),
    Target(
        "tg-bearer-trace-off",
        "tokengate",
        "bearer-warm",
        "/bearer",
        needs=ISSUER,
        floor="floor-bearer",
        tracing="off",
        note="tg-bearer-warm with tracing off (tracing.propagate: false): no trace ids, no "
        "traceparent upstream, none in the access line; tg-bearer-warm / this = what "
        "propagation costs",
    ),
    Target(
        "tg-bearer-trace-sdk",
        "tokengate",
        "bearer-warm",
        "/bearer",
        needs=ISSUER | {"otlp"},
        floor="floor-bearer",
        tracing="sdk",
        note="tg-bearer-warm with the OpenTelemetry SDK recording every request (sample_ratio "
        "1.0: a server and a client span each) and exporting them over OTLP/HTTP in batches "
        "to the bench's sink (answers at once, counts them); this / tg-bearer-warm (its x "
        "bearer) = what recording and exporting every span costs",
    ),
    Target(
        "floor-cold",
        "floor",
        "bearer-cold",
        needs=ISSUER,
        floor="floor-cold",
        note="the floor sent tg-bearer-cold's requests (a new token each, from the same file "
        "through wrk's pick_header.lua; forwarded as is): what the changing header costs wrk "
        "and the proxy, without checking it",
    ),
    Target(
        "tg-bearer-cold",
        "tokengate",
        "bearer-cold",
        "/bearer",
        needs=ISSUER,
        floor="floor-cold",
        note="a new token every request, cache miss (signature check); same-request floor: "
        "floor-cold",
    ),
    Target(
        "floor-introspect",
        "floor",
        "introspect-warm",
        needs=ISSUER,
        floor="floor-introspect",
        note="the floor sent tg-introspect-warm's Authorization: Bearer header (a 65-byte "
        "opaque token; forwarded as is)",
    ),
    Target(
        "tg-introspect-warm",
        "tokengate",
        "introspect-warm",
        "/introspect",
        needs=ISSUER,
        floor="floor-introspect",
        note="one opaque token (no JWS), RFC 7662 introspection at the bench issuer: one call "
        "per instance, then introspection-cache hits (cache_ttl_s 3600); its same-request "
        "floor is floor-introspect (floor-bearer's token is ten times longer)",
    ),
    Target(
        "floor-dpop",
        "floor",
        "dpop",
        needs=ISSUER,
        floor="floor-dpop",
        note="the floor sent tg-dpop's request (Authorization: DPoP and a new DPoP proof each "
        "request, from the same proofs file; forwarded as is)",
    ),
    Target(
        "tg-dpop",
        "tokengate",
        "dpop",
        "/dpop",
        needs=ISSUER,
        floor="floor-dpop",
        note="one DPoP-bound RS256 token (cnf.jkt; verified-token cache hit) and a new ES256 "
        "DPoP proof every request (signature, claims, jti remembered): route require_dpop, "
        "dpop.replay_store memory; with replay_store redis each request adds one Redis SET "
        "NX. Same-request floor: floor-dpop",
    ),
    Target(
        "floor-session",
        "floor",
        "session",
        needs=ISSUER | {"redis"},
        floor="floor-session",
        note="the floor sent tg-session's requests (a session cookie each, from the same file "
        "through wrk's pick_header.lua, and the CSRF header; forwarded as is)",
    ),
    Target(
        "tg-session",
        "tokengate",
        "session",
        "/session",
        needs=ISSUER | {"redis"},
        floor="floor-session",
        note="session cookie (one of many pre-made sessions per request), Redis store, "
        "access token valid: no refresh; same-request floor: floor-session",
    ),
    Target(
        "tg-refresh-storm",
        "tokengate",
        "refresh-storm",
        "/session",
        needs=ISSUER | {"redis"},
        wrk=False,
        note="concurrent requests on one session whose access token has expired: "
        "one refresh grant at the issuer, every request 200 (its own section)",
    ),
)
BY_NAME = {t.name: t for t in TARGETS}
THROUGHPUT = (
    "nginx",
    "raw-static",
    "aio-static",
    "floor",
    "floor-http1",
    "floor-bearer",
    "tg-none",
    "tg-bearer-warm",
    "tg-bearer-trace-off",
    "tg-bearer-trace-sdk",
    "floor-cold",
    "tg-bearer-cold",
    "floor-introspect",
    "tg-introspect-warm",
    "floor-dpop",
    "tg-dpop",
    "floor-session",
    "tg-session",
)
# Latency is against the origin: the floors sent other targets' requests add nothing there
# (floor-bearer, the first of them, stays as it always was).
_SAME_REQUEST_FLOORS = ("floor-introspect", "floor-dpop", "floor-cold", "floor-session")
LATENCY = ("origin", *(n for n in THROUGHPUT if n not in _SAME_REQUEST_FLOORS))

SESSION_COOKIE = "tg_session"  # no __Host- prefix: the bench is plain http on loopback
CSRF_HEADER = "X-CSRF"  # tokengate's csrf.header, which every cookie request must carry


def session_settings(redis_url: str) -> dict[str, Any]:
    """tokengate's ``session:`` section; the driver seeds Redis with these same settings."""
    return {
        "store": "redis",
        "redis_url": redis_url,
        "key_prefix": "tgbench",
        "cookie_name": SESSION_COOKIE,
        "cookie_secure": False,  # allowed: public_url is http://127.0.0.1
        # Long enough that no seeded session idles out during a long run.
        "idle_timeout_s": 86400,
        "absolute_timeout_s": 7 * 86400,
    }


def tokengate_config(
    *,
    port: int,
    admin_port: int,
    origin_url: str,
    issuer_url: str | None,
    redis_url: str | None,
    workers: int,
    access_log: bool,
    token_cache_size: int,
    tracing: Tracing = "default",
    otlp_url: str | None = None,
) -> dict[str, Any]:
    """A tokengate configuration for one benchmark instance (loopback only).

    With ``issuer_url``, the routes ``/bearer/`` (JWTs), ``/introspect/`` (opaque tokens,
    introspected at the issuer by the ``oidc`` provider: they are no JWS) and ``/dpop/``
    (``require_dpop``, proofs remembered in memory); with ``redis_url`` as well, a
    ``/session/`` route and the session, client and CSRF settings it needs (refresh:
    oauth2 at the issuer's ``token_endpoint`` from discovery, tokengate's default
    timeouts). ``tracing``: ``off`` sets ``propagate: false``; ``sdk`` exports every span
    to ``otlp_url`` (the bench's sink) over OTLP/HTTP; ``default`` sets nothing."""
    routes: list[dict[str, Any]] = [
        {"prefix": "/none/", "upstream": origin_url, "auth": "none", "strip_prefix": True},
    ]
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "public_url": f"http://127.0.0.1:{port}",
        "workers": workers,
        "limits": {"shutdown_delay_s": 0, "shutdown_grace_s": 2},
        "log": {"access_log": access_log, "format": "json"},
        "routes": routes,
    }
    if tracing == "off":
        config["tracing"] = {"propagate": False}
    elif tracing == "sdk":
        if otlp_url is None:
            raise ValueError("tracing sdk needs the OTLP sink's URL")
        config["tracing"] = {
            "exporter": "otlp_http",
            "endpoint": f"{otlp_url}/v1/traces",
            "sample_ratio": 1.0,
        }
    if issuer_url is not None:
        config["oidc"] = {
            "issuer": issuer_url,
            "audience": AUDIENCE,
            "token_cache_size": token_cache_size,
            # JWTs are still checked locally (validation: jwt); only opaque tokens go here.
            "introspection": {
                "endpoint": f"{issuer_url}/introspect",
                "client_id": INTROSPECTION_CLIENT_ID,
                "client_secret": INTROSPECTION_CLIENT_SECRET,
                "client_auth": "client_secret_basic",
                "cache_ttl_s": INTROSPECTION_CACHE_TTL_S,
            },
        }
        # The proof's own cost: with replay_store redis, each request adds one SET NX.
        config["dpop"] = {"replay_store": "memory"}
        for prefix, extra in (
            ("/bearer/", {}),
            ("/introspect/", {}),
            ("/dpop/", {"require_dpop": True}),
        ):
            routes.append(
                {
                    "prefix": prefix,
                    "upstream": origin_url,
                    "auth": "bearer",
                    "scopes": ["api.read"],
                    "strip_prefix": True,
                    **extra,
                }
            )
        if redis_url is not None:
            config["oidc"].update(client_id=CLIENT_ID, client_auth="none")
            config["session"] = session_settings(redis_url)
            config["csrf"] = {"header": CSRF_HEADER}
            routes.append(
                {
                    "prefix": "/session/",
                    "upstream": origin_url,
                    "auth": "session",
                    "scopes": ["api.read"],
                    "strip_prefix": True,
                }
            )
    return config

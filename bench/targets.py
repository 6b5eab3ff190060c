"""What the benchmark measures: the table of targets and the tokengate config they run.

A target is a server to start (``kind``), a path on it and the credentials wrk sends
(``client``). Adding a tokengate mode is adding a row here, a route in
:func:`tokengate_config` and, when the client needs fixtures, a branch in ``run.py``'s
``Fixtures.client_args``.

TODO(session): when tokengate has session mode, flip ``tg-session`` to ``ready=True``:
  1. fixtures: start ``redis-server --port 0``-style on a free loopback port (the
     ``needs={"redis"}`` hook in run.py) and create N sessions — through the public
     login flow against a real IdP, or by writing them with gateway.sessions' store API;
     write one cookie value per line to ``cookies.txt``;
  2. client ``session``: ``bench/lua/pick_header.lua`` with HEADER=Cookie,
     PREFIX="<cookie_name>=" over cookies.txt, plus ``-H "X-CSRF: 1"``;
  3. the ``/session/`` route below (``auth: session``) and ``session:`` settings.
TODO(refresh-storm): ``tg-refresh-storm`` = the session target whose sessions hold
access tokens that expire during the run, with bench/issuer.py answering refresh grants
at ``/token`` (counting them); assert grants == sessions x expiries, report req/s and
p99 during the storm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from issuer import AUDIENCE

Kind = Literal["origin", "nginx", "floor", "tokengate"]
Client = Literal["plain", "bearer-warm", "bearer-cold", "session", "refresh-storm"]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: Kind
    client: Client = "plain"
    path: str = ""  # prefix before /<body> on this server
    workers: int = 1
    needs: frozenset[str] = field(default_factory=frozenset)  # fixtures: "issuer", "redis"
    ready: bool = True  # False: listed, skipped with ``note``
    note: str = ""

    @property
    def is_tokengate(self) -> bool:
        return self.kind == "tokengate"


ISSUER = frozenset({"issuer"})
TARGETS: tuple[Target, ...] = (
    Target("origin", "origin", note="wrk straight to the origin (latency baseline)"),
    Target("nginx", "nginx", note="nginx proxy_pass, 1 worker: the limit"),
    Target("floor", "floor", note="bare aiohttp pass-through: the floor"),
    Target("tg-none", "tokengate", path="/none", note="auth: none"),
    Target(
        "tg-bearer-warm",
        "tokengate",
        "bearer-warm",
        "/bearer",
        needs=ISSUER,
        note="one valid RS256 token, verified-token cache hit",
    ),
    Target(
        "tg-bearer-cold",
        "tokengate",
        "bearer-cold",
        "/bearer",
        needs=ISSUER,
        note="a new token every request, cache miss (signature check)",
    ),
    Target(
        "tg-session",
        "tokengate",
        "session",
        "/session",
        needs=ISSUER | {"redis"},
        ready=False,
        note="not built yet: tokengate has no session mode (TODO in targets.py)",
    ),
    Target(
        "tg-refresh-storm",
        "tokengate",
        "refresh-storm",
        "/session",
        needs=ISSUER | {"redis"},
        ready=False,
        note="not built yet: needs sessions and an issuer /token (TODO in targets.py)",
    ),
)
BY_NAME = {t.name: t for t in TARGETS}
THROUGHPUT = ("nginx", "floor", "tg-none", "tg-bearer-warm", "tg-bearer-cold")
LATENCY = ("origin", *THROUGHPUT)


def tokengate_config(
    *,
    port: int,
    admin_port: int,
    origin_url: str,
    issuer_url: str | None,
    workers: int,
    access_log: bool,
    token_cache_size: int,
) -> dict[str, Any]:
    """A tokengate configuration for one benchmark instance (loopback only)."""
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
    if issuer_url is not None:
        config["oidc"] = {
            "issuer": issuer_url,
            "audience": AUDIENCE,
            "token_cache_size": token_cache_size,
        }
        routes.append(
            {
                "prefix": "/bearer/",
                "upstream": origin_url,
                "auth": "bearer",
                "scopes": ["api.read"],
                "strip_prefix": True,
            }
        )
        # TODO(session): {"prefix": "/session/", "upstream": origin_url, "auth": "session",
        #   "scopes": ["api.read"], "strip_prefix": True} and a "session:" section.
    return config

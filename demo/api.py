"""The demo's upstream API, reached through tokengate (route ``/api``, ``session_or_bearer``).

    GET  /api/me        the caller's access-token claims and the server time
    GET  /api/items     the shared in-memory list
    POST /api/items     {"text": "..."} appends to it
    GET  /__demo/stats  requests that reached /api/*, for the e2e tests; only on this port

It never echoes the token, nor any request header. Run by ``demo.stack``:
``python demo/api.py --port 9001`` prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler

MAX_ITEMS = 50
MAX_TEXT = 200

REQUESTS: web.AppKey[Counter[str]] = web.AppKey("requests")  # path -> requests at /api/*
ITEMS: web.AppKey[list[dict[str, Any]]] = web.AppKey("items")
IDS: web.AppKey[itertools.count[int]] = web.AppKey("ids")


def error(status: int, code: str, description: str) -> web.Response:
    return web.json_response({"error": code, "error_description": description}, status=status)


def caller_claims(request: web.Request) -> dict[str, Any] | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        # Decoded WITHOUT verification, for the demo only: tokengate validated this JWT
        # (signature, iss, aud, exp, scope) before forwarding, and this API listens on
        # loopback where nothing but tokengate reaches it. An API anyone else can reach
        # must verify the signature itself.
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    return claims


@web.middleware
async def count_and_authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    # Counted before anything else: a request tokengate should have refused shows up here.
    request.app[REQUESTS][request.path] += 1
    claims = caller_claims(request)
    if claims is None:
        return error(401, "unauthenticated", "a Bearer access token is required")
    request["claims"] = claims
    return await handler(request)


async def me(request: web.Request) -> web.Response:
    now = datetime.now(UTC)
    return web.json_response(
        {"claims": request["claims"], "server_time": now.isoformat(timespec="seconds")}
    )


async def list_items(request: web.Request) -> web.Response:
    return web.json_response({"items": request.app[ITEMS]})


async def add_item(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return error(400, "invalid_request", "the body must be JSON")
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        return error(400, "invalid_request", f"text must be 1..{MAX_TEXT} characters")
    claims = request["claims"]
    ids = request.app[IDS]
    item = {
        "id": next(ids),
        "text": text.strip(),
        "owner": claims.get("sub"),
        "created_at": int(time.time()),
    }
    items = request.app[ITEMS]
    items.append(item)
    del items[:-MAX_ITEMS]
    return web.json_response({"item": item, "items": items}, status=201)


async def stats(request: web.Request) -> web.Response:
    if "X-Forwarded-For" in request.headers:
        raise web.HTTPNotFound()  # came through a proxy: this is for direct callers only
    counts = request.app[REQUESTS]
    by_path = dict(counts)
    return web.json_response({"requests": sum(by_path.values()), "by_path": by_path})


def build_app() -> web.Application:
    app = web.Application(middlewares=[count_and_authenticate])
    app[REQUESTS] = Counter()
    app[ITEMS] = []
    app[IDS] = itertools.count(1)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/items", list_items)
    app.router.add_post("/api/items", add_item)
    app.router.add_get("/__demo/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(
        build_app(),
        host=args.host,
        port=args.port,
        shutdown_timeout=2.0,
        print=lambda _: print(f"READY {args.port}", flush=True),
        access_log_format='%a "%r" %s %b %Tfs',  # the request line only, never a header
    )


if __name__ == "__main__":
    main()

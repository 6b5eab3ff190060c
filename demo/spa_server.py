"""Serves the demo SPA (``demo/spa/``) as plain static files; tokengate's ``/`` route (auth
``none``) sits in front of it. No build step, no templating.

The pages get a strict Content-Security-Policy: scripts from this origin only, and the one
inline ``<style>`` block of ``index.html`` allowed by its hash. ``python demo/spa_server.py
--port 9002`` prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import re
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

SPA_DIR = Path(__file__).resolve().parent / "spa"
FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js"}
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy() -> str:
    html = (SPA_DIR / "index.html").read_text(encoding="utf-8")
    style_src = " ".join(csp_hash(style) for style in _STYLE.findall(html)) or "'none'"
    return (
        "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
        f"style-src {style_src}; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


def build_app() -> web.Application:
    headers = {
        "Content-Security-Policy": content_security_policy(),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @web.middleware
    async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers.update(headers)
        return response

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(SPA_DIR / FILES[request.path])

    app = web.Application(middlewares=[security_headers])
    for path in FILES:
        app.router.add_get(path, serve)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(
        build_app(),
        host=args.host,
        port=args.port,
        shutdown_timeout=2.0,
        print=lambda _: print(f"READY {args.port}", flush=True),
        access_log_format='%a "%r" %s %b %Tfs',
    )


if __name__ == "__main__":
    main()

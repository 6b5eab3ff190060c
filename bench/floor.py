"""The floor: the least an aiohttp reverse proxy does (uvloop, one pooled session, streaming).

``python bench/floor.py --port N --upstream http://127.0.0.1:M``. No auth, no metrics, no
logs; tokengate cannot be faster than this on the same stack.
"""

import argparse

import aiohttp
from aiohttp import web
from procs import serve_on_loopback

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()

    async def client(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            args.upstream, connector=aiohttp.TCPConnector(limit=1024), auto_decompress=False
        )
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = request.content if request.body_exists else None
        async with request.app[SESSION].request(
            request.method, request.raw_path, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
            )
            response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", handle)
    serve_on_loopback(app, args.port)


if __name__ == "__main__":
    main()

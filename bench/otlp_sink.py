"""The benchmark's OTLP/HTTP trace sink: where ``tg-bearer-trace-sdk`` exports its spans.

``python bench/otlp_sink.py --port N`` serves on 127.0.0.1:

- ``POST /v1/traces``: an ``ExportTraceServiceRequest`` (protobuf, gzip-compressed or
  not), answered 200 at once with an empty ``ExportTraceServiceResponse``
  (``application/x-protobuf``: no partial success, nothing rejected). The request is
  parsed only to count its spans, so the sink is no collector: it keeps nothing and does
  no work a collector would (batching, processing, sending on). It shares the cores with
  tokengate, the origin and wrk, so it is kept this small;
- ``GET /__stats``: export requests, spans and body bytes received, and export requests
  that could not be parsed (answered 400).
"""

from __future__ import annotations

import argparse
import gzip
import zlib

from procs import serve_on_loopback

_EMPTY_RESPONSE = b""  # an ExportTraceServiceResponse with no field set serializes empty


def main() -> None:
    from aiohttp import web
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    parser = argparse.ArgumentParser(description="count OTLP/HTTP trace exports")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    stats = {"requests": 0, "spans": 0, "bytes": 0, "malformed": 0}

    async def post_traces(request: web.Request) -> web.Response:
        body = await request.read()
        stats["requests"] += 1
        stats["bytes"] += len(body)
        try:
            if request.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            export = ExportTraceServiceRequest.FromString(body)
        except (DecodeError, OSError, EOFError, zlib.error):
            stats["malformed"] += 1
            return web.Response(status=400, text="not an ExportTraceServiceRequest")
        stats["spans"] += sum(
            len(scope.spans) for resource in export.resource_spans for scope in resource.scope_spans
        )
        return web.Response(body=_EMPTY_RESPONSE, content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=64 * 1024 * 1024)  # a batch of 512 spans is ~0.2 MB
    app.router.add_post("/v1/traces", post_traces)
    app.router.add_get("/__stats", get_stats)
    serve_on_loopback(app, args.port)


if __name__ == "__main__":
    main()

"""An OTLP/HTTP trace receiver for tests: what tokengate exports, decoded.

    receiver = OtlpReceiver()
    await receiver.start()                       # 127.0.0.1, a free port
    config["tracing"] = receiver.tracing_config()  # exporter otlp_http, 50 ms batches
    ...
    span = await receiver.wait_for_span("session refresh", trace_id=...)
    tree = receiver.tree(trace_id)
    await receiver.close()

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` (``application/x-protobuf``,
gzip or not) and answers an empty ``ExportTraceServiceResponse``; every span becomes a
:class:`ReceivedSpan` of plain Python values. Waiting is on an ``asyncio.Condition``
notified per export, never a sleep. The raw bodies are kept too, for checks that must
cover every byte sent (redaction).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto

# OTLP's enums, by the names the SDK's SpanKind and StatusCode use.
KINDS = {
    SpanProto.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    SpanProto.SPAN_KIND_INTERNAL: "INTERNAL",
    SpanProto.SPAN_KIND_SERVER: "SERVER",
    SpanProto.SPAN_KIND_CLIENT: "CLIENT",
    SpanProto.SPAN_KIND_PRODUCER: "PRODUCER",
    SpanProto.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS_CODES = {
    StatusProto.STATUS_CODE_UNSET: "UNSET",
    StatusProto.STATUS_CODE_OK: "OK",
    StatusProto.STATUS_CODE_ERROR: "ERROR",
}


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the Python value it carries."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class SpanEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None  # None for a root span
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status_code: str  # UNSET, OK, ERROR
    status_message: str
    events: tuple[SpanEvent, ...]
    links: tuple[dict[str, Any], ...]  # each link's attributes
    trace_state: str
    start_ns: int  # Unix time, nanoseconds
    end_ns: int

    @property
    def service(self) -> str | None:
        name = self.resource.get("service.name")
        return name if isinstance(name, str) else None


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=KINDS[span.kind],
                        attributes=attributes(span.attributes),
                        resource=resource,
                        scope=scope_spans.scope.name,
                        status_code=STATUS_CODES[span.status.code],
                        status_message=span.status.message,
                        events=tuple(
                            SpanEvent(event.name, attributes(event.attributes))
                            for event in span.events
                        ),
                        links=tuple(attributes(link.attributes) for link in span.links),
                        trace_state=span.trace_state,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return spans


@dataclass
class SpanTree:
    """One trace's spans by parent: ``children(span)``, ``roots``, ``parent(span)``."""

    spans: list[ReceivedSpan]
    by_id: dict[str, ReceivedSpan] = field(init=False)
    _children: dict[str | None, list[ReceivedSpan]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {span.span_id: span for span in self.spans}
        self._children = {}
        for span in self.spans:
            self._children.setdefault(span.parent_span_id, []).append(span)

    @property
    def roots(self) -> list[ReceivedSpan]:
        """Spans whose parent is not in this trace's export (a remote parent, or none)."""
        return [s for s in self.spans if s.parent_span_id not in self.by_id]

    def children(self, span: ReceivedSpan) -> list[ReceivedSpan]:
        return list(self._children.get(span.span_id, ()))

    def parent(self, span: ReceivedSpan) -> ReceivedSpan | None:
        return self.by_id.get(span.parent_span_id or "")

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReceivedSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r}: {self.render()}"
        return found[0]

    def render(self) -> str:
        """The tree as indented text, for assertion messages."""
        lines: list[str] = []

        def walk(span: ReceivedSpan, depth: int) -> None:
            lines.append(f"{'  ' * depth}{span.name} [{span.kind}] {span.span_id}")
            for child in self.children(span):
                walk(child, depth + 1)

        for root in self.roots:
            walk(root, 0)
        return "\n".join(lines)


class OtlpReceiver:
    """An aiohttp OTLP/HTTP endpoint on 127.0.0.1 collecting every exported span."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.bodies: list[bytes] = []  # decompressed, as received
        self.exports = 0
        self._changed = asyncio.Condition()
        self._server: TestServer | None = None

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.make_url("/v1/traces"))

    def tracing_config(self, **overrides: Any) -> dict[str, Any]:
        """tokengate's ``tracing`` section exporting here."""
        return {
            "exporter": "otlp_http",
            "endpoint": self.endpoint,
            "export_interval_ms": 50,
            **overrides,
        }

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        spans = decode(body)
        async with self._changed:
            self.bodies.append(body)
            self.spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_until(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10.0
    ) -> None:
        """Until ``predicate(all spans so far)`` holds (checked at once and per export)."""
        async with asyncio.timeout(timeout_s):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.spans))

    async def wait_for_span(
        self, name: str, *, trace_id: str | None = None, timeout_s: float = 10.0
    ) -> ReceivedSpan:
        """The first span named ``name`` (in ``trace_id``, if given), once it arrives."""
        await self.wait_until(
            lambda spans: any(self._matches(s, name, trace_id) for s in spans), timeout_s
        )
        return next(s for s in self.spans if self._matches(s, name, trace_id))

    async def wait_for_spans(
        self, names: list[str], *, trace_id: str, timeout_s: float = 10.0
    ) -> SpanTree:
        """The trace's tree once a span of each of ``names`` is in it."""
        await self.wait_until(
            lambda spans: all(
                any(self._matches(s, name, trace_id) for s in spans) for name in names
            ),
            timeout_s,
        )
        return self.tree(trace_id)

    @staticmethod
    def _matches(span: ReceivedSpan, name: str, trace_id: str | None) -> bool:
        return span.name == name and (trace_id is None or span.trace_id == trace_id)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def tree(self, trace_id: str) -> SpanTree:
        return SpanTree(self.trace(trace_id))

    def trace_ids(self) -> set[str]:
        return {s.trace_id for s in self.spans}


def every_text(spans: list[ReceivedSpan]) -> Iterator[str]:
    """Every name and value a span carries, as text: span, event and link attributes,
    resource attributes, names, status messages and trace states."""

    def values(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield str(key)
                yield from values(item)
        elif isinstance(value, list):
            for item in value:
                yield from values(item)
        elif isinstance(value, bytes):
            yield value.decode("utf-8", "replace")
        elif value is not None:
            yield str(value)

    for span in spans:
        yield span.name
        yield span.scope
        yield span.status_message
        yield span.trace_state
        yield from values(span.attributes)
        yield from values(span.resource)
        for event in span.events:
            yield event.name
            yield from values(event.attributes)
        for link in span.links:
            yield from values(link)


__all__ = [
    "OtlpReceiver",
    "ReceivedSpan",
    "SpanEvent",
    "SpanTree",
    "decode",
    "every_text",
]

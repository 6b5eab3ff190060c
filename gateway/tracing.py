"""Traces: W3C trace context through the gateway, and OpenTelemetry spans when exported.

Propagation is always on and costs next to nothing: a valid incoming ``traceparent`` (with
its ``tracestate``) is continued, anything else starts a new trace (malformed input never
errors); each request gets a span id of its own, which the upstream receives as its
parent and the access line carries. Parsing is OpenTelemetry's W3C propagator's, only when
the header is there.

With ``tracing.exporter`` set, an SDK ``TracerProvider`` (the ``otel`` extra) records: a
server span per request, a client span per upstream call (the upstream's parent then),
and the spans other modules open with ``tracer`` (key and discovery fetches,
introspection, refresh and its lock wait, session loads), sampled by ratio and parent
first, exported over OTLP in batches and flushed at shutdown. Attributes are chosen, never
copied from a request: no token, cookie, code, state or query string is ever one.

``Tracing`` owns the provider (``aclose`` flushes and shuts it down); ``ingress`` opens a
request's trace with ``start``, ``upstream`` asks ``upstream_span`` for the hop.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

NO_TRACER: Tracer = trace.NoOpTracer()  # stateless: what components trace with by default
_PROPAGATOR = TraceContextTextMapPropagator()


class TraceIds:
    """A request's place in its trace: the trace, tokengate's span, the flags to pass on.
    The ids in hex are formatted once, for the upstream's header and the access line.
    (A plain class: a dataclass's ``__post_init__`` would be one more call per request.)"""

    __slots__ = ("sampled", "span_id", "span_id_hex", "trace_id", "trace_id_hex", "tracestate")

    def __init__(
        self, trace_id: int, span_id: int, sampled: bool, tracestate: str | None = None
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate  # as received; forwarded as is
        self.trace_id_hex = f"{trace_id:032x}"
        self.span_id_hex = f"{span_id:016x}"

    def traceparent(self, span_id: int | None = None) -> str:
        flags = "-01" if self.sampled else "-00"
        span = self.span_id_hex if span_id is None else f"{span_id:016x}"
        return f"00-{self.trace_id_hex}-{span}{flags}"


class RequestTrace:
    """One request's trace: its ids, and its server span when spans are recorded."""

    __slots__ = ("_token", "ids", "span")

    def __init__(self, ids: TraceIds | None, span: Span | None, token: object | None) -> None:
        self.ids = ids
        self.span = span
        self._token = token

    def finish(self, *, method: str, route: str, status: int, outcome: str, auth: str) -> None:
        """End the server span with what the request came to (HTTP semantic conventions
        where they have a name; the route is tokengate's route name)."""
        span = self.span
        if span is None:
            return
        if span.is_recording():
            if route != "-":
                span.update_name(f"{method} {route}")
                span.set_attribute("tokengate.route", route)
            span.set_attribute("http.response.status_code", status)
            span.set_attribute("tokengate.outcome", outcome)
            span.set_attribute("tokengate.auth", auth)
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR)
        span.end()
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]  # attach's token


class Tracing:
    """Owns the tracer provider when spans are exported; ``tracer`` is a no-op otherwise."""

    def __init__(self, settings: TracingSettings, *, service_version: str = "") -> None:
        self._settings = settings
        self._version = service_version
        self._provider: TracerProvider | None = None
        self.tracer: Tracer = NO_TRACER

    def open(self) -> None:
        """Start recording (the exporter's thread), in the process that serves: a worker
        forked after this would have no exporter thread."""
        if self._settings.exporter != "none" and self._provider is None:
            self._provider = _build_provider(self._settings, self._version)
            self.tracer = self._provider.get_tracer("tokengate", self._version)

    @property
    def recording(self) -> bool:
        return self._provider is not None

    def start(self, headers: Mapping[str, str], method: str) -> RequestTrace:
        """The trace of a request arriving with ``headers``: continued or new."""
        parent: otel_context.Context | None = None
        propagate = self._settings.propagate
        if propagate and "traceparent" in headers:
            parent = _PROPAGATOR.extract(headers)
        elif propagate and self._provider is None:
            # Most requests: a new trace, nothing here records it, so the sampling decision
            # is the upstream's.
            return RequestTrace(_new_trace(_random_bits(64) or 1), None, None)
        if self._provider is None:
            if not propagate:
                return _UNTRACED  # no ids, nothing sent upstream: tracing off
            return RequestTrace(self._ids_without_sdk(parent), None, None)
        span = self.tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes={"http.request.method": method}
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        context = span.get_span_context()
        ids = TraceIds(
            context.trace_id,
            context.span_id,
            context.trace_flags.sampled,
            _tracestate(parent),
        )
        return RequestTrace(ids, span, token)

    @contextlib.contextmanager
    def upstream_span(
        self, ids: TraceIds | None, method: str, host: str, port: int | None
    ) -> Iterator[tuple[Span | None, str | None]]:
        """The upstream call's client span (recorded only) and the ``traceparent`` to send."""
        if ids is None:
            yield None, None
            return
        if self._provider is None:
            yield None, ids.traceparent()
            return
        attributes: dict[str, Any] = {"http.request.method": method, "server.address": host}
        if port is not None:
            attributes["server.port"] = port
        with self.tracer.start_as_current_span(
            method, kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            context = span.get_span_context()
            yield span, ids.traceparent(context.span_id) if context.is_valid else ids.traceparent()

    def _ids_without_sdk(self, parent: otel_context.Context | None) -> TraceIds:
        span_id = random.getrandbits(64) or 1
        if parent is not None:
            context = trace.get_current_span(parent).get_span_context()
            if context.is_valid:
                return TraceIds(
                    context.trace_id, span_id, context.trace_flags.sampled, _tracestate(parent)
                )
        return _new_trace(span_id)

    async def aclose(self, timeout_s: float) -> None:
        """Export what is buffered, within ``timeout_s`` (the drain grace), and stop."""
        provider, self._provider = self._provider, None
        self.tracer = NO_TRACER
        if provider is None:
            return
        import asyncio

        flushed = await asyncio.to_thread(provider.force_flush, int(timeout_s * 1000))
        if not flushed:
            log.warning("traces_not_flushed", extra={"timeout_s": timeout_s})
        await asyncio.to_thread(provider.shutdown)


def _new_trace(span_id: int) -> TraceIds:
    """A new trace's ids, flagged sampled: nothing here records it, so the sampling
    decision is the upstream's."""
    return TraceIds(_random_bits(128) or 1, span_id, True)


_random_bits = random.getrandbits


def _tracestate(parent: otel_context.Context | None) -> str | None:
    if parent is None:
        return None
    state = trace.get_current_span(parent).get_span_context().trace_state
    return state.to_header() or None if state else None


def _build_provider(settings: TracingSettings, service_version: str) -> TracerProvider:
    """An SDK provider exporting over OTLP; the ``otel`` extra must be installed (checked
    by ``preflight``). Endpoints and headers not configured come from ``OTEL_*``."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create(
        {SERVICE_NAME: settings.service_name, SERVICE_VERSION: service_version}
    )
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    headers = {k: v.get_secret_value() for k, v in settings.headers.items()} or None
    if settings.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter: Any = GrpcExporter(endpoint=settings.endpoint, headers=headers)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=settings.endpoint, headers=headers)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=settings.export_interval_ms)
    )
    return provider


_UNTRACED = RequestTrace(None, None, None)  # immutable in use: finish() returns at once

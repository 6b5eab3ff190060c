"""Traces through the gateway: W3C propagation, the spans an OTLP receiver gets, exemplars.

Spans are read where they end up, at an OTLP/HTTP receiver decoding what the exporter
sends (tests/support/otlp.py); the upstream's view is the fake upstream's recorded headers.
Every gateway here is closed before the receiver, so what it flushes on the way out lands.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.admin import Readiness, build_admin_app
from gateway.app import ACCESS_LOG, build_app
from gateway.metrics import Metrics
from gateway.settings import parse_settings
from tests.conftest import base_config
from tests.fakes.issuer import FakeIssuer
from tests.fakes.upstream import FakeUpstream
from tests.support.otlp import OtlpReceiver

Gateway = TestClient[web.Request, web.Application]
OpenGateway = Callable[..., Awaitable[Gateway]]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
WELL_FORMED = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def traceparent(trace_id: str = CLIENT_TRACE, span_id: str = CLIENT_SPAN, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def received(upstream: FakeUpstream) -> tuple[str, str, str]:
    """The last upstream request's traceparent: (trace id, parent span id, flags)."""
    value = upstream.seen[-1].headers.getall("traceparent")
    assert len(value) == 1, value
    match = WELL_FORMED.fullmatch(value[0])
    assert match is not None, value
    trace_id, parent_id, flags = match.groups()
    assert int(trace_id, 16) != 0
    assert int(parent_id, 16) != 0
    return trace_id, parent_id, flags


def access_lines(app: web.Application, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The access lines written so far (the batch flushed first; they go to stderr)."""
    app[ACCESS_LOG].flush()
    lines = capsys.readouterr().err.splitlines()
    return [line for line in map(json.loads, filter(None, lines)) if line.get("event") == "access"]


@pytest.fixture
async def open_gateway(
    receiver: OtlpReceiver, issuer: FakeIssuer, upstream: tuple[FakeUpstream, str]
) -> AsyncIterator[OpenGateway]:
    """Gateways over the fake issuer and upstream, closed before the receiver is."""
    clients: list[Gateway] = []

    async def open_(metrics: Metrics | None = None, **overrides: Any) -> Gateway:
        settings = parse_settings(base_config(issuer.url, upstream[1], **overrides))
        client: Gateway = TestClient(TestServer(build_app(settings, metrics=metrics)))
        await client.start_server()
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


# -- propagation only (no exporter) ------------------------------------------------------


async def test_a_client_trace_is_continued_with_our_span_as_the_upstreams_parent(
    open_gateway: OpenGateway,
    upstream: tuple[FakeUpstream, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await open_gateway()
    headers = {"traceparent": traceparent(), "tracestate": "vendor=abc,other=x:1"}
    resp = await gateway.get("/public/x", headers=headers)
    assert resp.status == 200
    trace_id, parent_id, flags = received(upstream[0])
    assert trace_id == CLIENT_TRACE
    assert parent_id != CLIENT_SPAN  # ours, not the client's
    assert flags == "01"
    assert upstream[0].seen[-1].headers.getall("tracestate") == ["vendor=abc,other=x:1"]
    [line] = access_lines(gateway.app, capsys)
    assert line["trace_id"] == CLIENT_TRACE
    assert line["span_id"] == parent_id


async def test_a_request_without_traceparent_starts_a_new_trace(
    open_gateway: OpenGateway,
    upstream: tuple[FakeUpstream, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await open_gateway()
    assert (await gateway.get("/public/x")).status == 200
    assert (await gateway.get("/public/y")).status == 200
    seen = [WELL_FORMED.fullmatch(s.headers["traceparent"]) for s in upstream[0].seen]
    assert all(seen), [s.headers.get("traceparent") for s in upstream[0].seen]
    ids = [m.groups() for m in seen if m is not None]
    assert ids[0][0] != ids[1][0]  # a new trace per request
    assert CLIENT_TRACE not in {trace_id for trace_id, _, _ in ids}
    assert "tracestate" not in upstream[0].seen[-1].headers
    lines = access_lines(gateway.app, capsys)
    assert [(line["trace_id"], line["span_id"]) for line in lines] == [
        (trace_id, span_id) for trace_id, span_id, _ in ids
    ]


def w3c_trace_id(value: str) -> str | None:
    """The trace id a W3C Trace Context (level 1) receiver takes from ``value``, else None.

    Version 00 is exactly 55 characters; a higher version (not ff) may carry more fields
    after a dash. Hex is lowercase; all-zero trace or parent ids are invalid."""
    value = value.strip(" \t")
    match = re.fullmatch(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", value)
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if int(trace_id, 16) == 0 or int(parent_id, 16) == 0:
        return None
    return trace_id


def w3c_sampled(value: str) -> bool:
    return bool(int(value.strip(" \t").split("-")[3][:2], 16) & 1)


_HEX = "0123456789abcdef"
_VISIBLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@st.composite
def near_valid_traceparents(draw: st.DrawFn) -> str:
    """A traceparent from valid parts, perhaps bent in one or two ways."""
    version = draw(st.sampled_from(["00", "00", "00", "01", "cc", "ff", "0", "000", "0g"]))
    trace_id = draw(
        st.sampled_from(["0" * 32, CLIENT_TRACE]) | st.text(_HEX, min_size=31, max_size=33)
    )
    span_id = draw(
        st.sampled_from(["0" * 16, CLIENT_SPAN]) | st.text(_HEX, min_size=15, max_size=17)
    )
    flags = draw(st.sampled_from(["00", "01", "03", "ff", "0", "1", "001"]))
    parts = [version, trace_id, span_id, flags]
    if draw(st.booleans()):
        index = draw(st.integers(0, 3))
        parts[index] = parts[index].upper()
    value = "-".join(parts)
    if draw(st.booleans()):
        value += draw(st.sampled_from(["-", "-x", "-00", "x", "--", "-what-ever"]))
    separator = draw(st.sampled_from(["-", "-", "-", "_", " "]))
    value = value.replace("-", separator, 1)
    padding = draw(st.sampled_from(["", " ", "\t"]))
    return padding + value + padding


_traceparents = near_valid_traceparents() | st.text(_VISIBLE, max_size=80)
_tracestates = st.none() | st.text(_VISIBLE, max_size=80) | st.just("vendor=abc,other=x:1")


@given(value=_traceparents, state=_tracestates)
@example(value=traceparent(), state="a=b")
@example(value=traceparent(flags="00"), state=None)
@example(value=f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-future-field", state=None)
@example(value=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra", state=None)
@example(value=f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", state=None)
@example(value=f"00-{'0' * 32}-{CLIENT_SPAN}-01", state=None)
@example(value=f"00-{CLIENT_TRACE}-{'0' * 16}-01", state=None)
@example(value=f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01", state=None)
@example(value=f"00-{CLIENT_TRACE}0-{CLIENT_SPAN}-01", state=None)
async def test_any_traceparent_yields_a_well_formed_one_continuing_only_a_valid_trace(
    gateway: Gateway,
    upstream: tuple[FakeUpstream, str],
    caplog: pytest.LogCaptureFixture,
    value: str,
    state: str | None,
) -> None:
    headers = {"traceparent": value}
    if state is not None:
        headers["tracestate"] = state
    resp = await gateway.get("/public/x", headers=headers)
    assert resp.status == 200
    trace_id, parent_id, flags = received(upstream[0])
    expected = w3c_trace_id(value)
    assert (trace_id == expected) == (expected is not None)
    if expected is not None:
        assert flags == ("01" if w3c_sampled(value) else "00")
        assert parent_id != value.strip(" \t").split("-")[2]
    assert not [r for r in caplog.records if r.getMessage() == "unhandled_error"]


# -- with the exporter -------------------------------------------------------------------


async def test_one_bearer_request_is_one_trace_from_the_client_to_the_upstream(
    open_gateway: OpenGateway,
    receiver: OtlpReceiver,
    issuer: FakeIssuer,
    upstream: tuple[FakeUpstream, str],
) -> None:
    gateway = await open_gateway(tracing=receiver.tracing_config(service_name="edge"))
    headers = {"traceparent": traceparent(), "Authorization": f"Bearer {issuer.mint()}"}
    resp = await gateway.get("/api/items?q=1", headers=headers)
    assert resp.status == 200
    tree = await receiver.wait_for_spans(["GET api", "GET"], trace_id=CLIENT_TRACE)

    server = tree.one("GET api")
    assert server.kind == "SERVER"
    assert server.parent_span_id == CLIENT_SPAN
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["tokengate.route"] == "api"
    assert server.attributes["tokengate.outcome"] == "ok"
    assert server.attributes["tokengate.auth"] == "bearer"
    assert server.status_code == "UNSET"
    assert server.resource["service.name"] == "edge"

    client = tree.one("GET")
    assert client.kind == "CLIENT"
    assert client.parent_span_id == server.span_id
    assert client.attributes["http.request.method"] == "GET"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["http.response.status_code"] == 200
    assert tree.roots == [server], tree.render()

    trace_id, parent_id, flags = received(upstream[0])
    assert (trace_id, parent_id, flags) == (CLIENT_TRACE, client.span_id, "01")
    # Nothing of the request's target or credentials is an attribute.
    assert not any("q=1" in str(v) for s in tree.spans for v in s.attributes.values())


async def test_an_upstream_5xx_marks_the_server_span_as_an_error(
    open_gateway: OpenGateway, receiver: OtlpReceiver, upstream: tuple[FakeUpstream, str]
) -> None:
    upstream[0].status_for["/public/broken"] = 503
    gateway = await open_gateway(tracing=receiver.tracing_config())
    resp = await gateway.get("/public/broken", headers={"traceparent": traceparent()})
    assert resp.status == 503
    tree = await receiver.wait_for_spans(["GET public"], trace_id=CLIENT_TRACE)
    server = tree.one("GET public")
    assert server.status_code == "ERROR"
    assert server.attributes["http.response.status_code"] == 503
    assert tree.one("GET").attributes["http.response.status_code"] == 503


async def test_a_sampled_requests_trace_is_its_latency_exemplar_in_openmetrics_only(
    open_gateway: OpenGateway, receiver: OtlpReceiver
) -> None:
    metrics = Metrics()
    gateway = await open_gateway(metrics, tracing=receiver.tracing_config())
    admin: Gateway = TestClient(TestServer(build_admin_app(Readiness(), metrics)))
    await admin.start_server()
    try:
        resp = await gateway.get("/public/x", headers={"traceparent": traceparent()})
        assert resp.status == 200

        resp = await admin.get("/metrics", headers={"Accept": OPENMETRICS})
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await resp.text()
        exemplars = [
            line
            for line in text.splitlines()
            if line.startswith("tokengate_http_request_duration_seconds_bucket{")
            and 'route="public"' in line
            and "# {" in line
        ]
        assert len(exemplars) == 1, text
        assert f'# {{trace_id="{CLIENT_TRACE}"}}' in exemplars[0]

        resp = await admin.get("/metrics")
        assert resp.headers["Content-Type"].startswith("text/plain")
        plain = await resp.text()
        assert 'tokengate_http_request_duration_seconds_count{route="public"} 1.0' in plain
        assert "trace_id" not in plain
        assert CLIENT_TRACE not in plain
    finally:
        await admin.close()


async def test_spans_buffered_at_shutdown_are_flushed_by_the_cleanup(
    open_gateway: OpenGateway, receiver: OtlpReceiver, upstream: tuple[FakeUpstream, str]
) -> None:
    gateway = await open_gateway(tracing=receiver.tracing_config(export_interval_ms=60000))
    resp = await gateway.get("/public/x", headers={"traceparent": traceparent()})
    assert resp.status == 200
    assert len(upstream[0].seen) == 1
    # The server span ended before the response was sent; it waits in the batch.
    assert receiver.exports == 0
    assert receiver.spans == []
    await gateway.close()  # the cleanup context: Tracing.aclose flushes, then shuts down
    tree = receiver.tree(CLIENT_TRACE)
    assert sorted(span.name for span in tree.spans) == ["GET", "GET public"], tree.render()
    assert receiver.exports >= 1


async def test_an_unsampled_new_trace_exports_nothing_but_still_propagates(
    open_gateway: OpenGateway, receiver: OtlpReceiver, upstream: tuple[FakeUpstream, str]
) -> None:
    metrics = Metrics()
    gateway = await open_gateway(metrics, tracing=receiver.tracing_config(sample_ratio=0))
    assert (await gateway.get("/public/x")).status == 200
    unsampled, _, flags = received(upstream[0])
    assert flags == "00"
    assert unsampled not in metrics.render(openmetrics=True).decode()  # no exemplar either

    # A caller's sampled decision stands (parent-based), whatever the ratio for new traces.
    other_trace = "0af7651916cd43dd8448eb211c80319c"
    headers = {"traceparent": traceparent(trace_id=other_trace)}
    assert (await gateway.get("/public/y", headers=headers)).status == 200
    assert received(upstream[0])[::2] == (other_trace, "01")
    tree = await receiver.wait_for_spans(["GET public", "GET"], trace_id=other_trace)
    assert tree.one("GET public").parent_span_id == CLIENT_SPAN
    # Spans are exported in the order they end: the first request's would be here by now.
    assert receiver.trace_ids() == {other_trace}
    assert other_trace in metrics.render(openmetrics=True).decode()


async def test_a_callers_unsampled_decision_stands_at_full_ratio(
    open_gateway: OpenGateway, receiver: OtlpReceiver, upstream: tuple[FakeUpstream, str]
) -> None:
    gateway = await open_gateway(tracing=receiver.tracing_config(sample_ratio=1))
    unsampled_trace = "1" * 32
    headers = {"traceparent": traceparent(trace_id=unsampled_trace, flags="00")}
    assert (await gateway.get("/public/x", headers=headers)).status == 200
    trace_id, parent_id, flags = received(upstream[0])
    assert (trace_id, flags) == (unsampled_trace, "00")
    assert parent_id != CLIENT_SPAN
    assert (await gateway.get("/public/y", headers={"traceparent": traceparent()})).status == 200
    await receiver.wait_for_spans(["GET public"], trace_id=CLIENT_TRACE)
    assert unsampled_trace not in receiver.trace_ids()


async def test_a_tracestate_goes_only_with_the_trace_it_belongs_to(
    open_gateway: OpenGateway, upstream: tuple[FakeUpstream, str]
) -> None:
    gateway = await open_gateway()
    headers = {"traceparent": "00-not-a-trace-01", "tracestate": "vendor=abc"}
    assert (await gateway.get("/public/x", headers=headers)).status == 200
    trace_id, _, _ = received(upstream[0])
    assert trace_id != CLIENT_TRACE
    assert "tracestate" not in upstream[0].seen[-1].headers  # W3C: not for a new trace


async def test_tracing_off_sends_and_logs_no_trace(
    open_gateway: OpenGateway,
    upstream: tuple[FakeUpstream, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await open_gateway(tracing={"propagate": False})
    headers = {"traceparent": traceparent(), "tracestate": "vendor=abc"}
    assert (await gateway.get("/public/x", headers=headers)).status == 200
    # Off: the client's headers pass as any other header would; nothing of ours is added.
    assert upstream[0].seen[-1].headers.getall("traceparent") == [traceparent()]
    assert (await gateway.get("/public/y")).status == 200
    assert "traceparent" not in upstream[0].seen[-1].headers
    lines = access_lines(gateway.app, capsys)
    assert len(lines) == 2
    assert all("trace_id" not in line and "span_id" not in line for line in lines)

"""Logging: redaction of credentials, and the batched access line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

from gateway.context import RequestContext
from gateway.logs import AccessLog, ContextFilter, JsonFormatter, hash_subject, redact
from gateway.settings import LogSettings

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"


def test_redact_hides_jwts_bearer_values_cookies_and_token_fields() -> None:
    text = redact(
        f"a {JWT} b Authorization: Bearer abc.def Cookie: tokengate=SECRETVALUE "
        'refresh_token=r-123 {"access_token": "opaque-456"}'
    )
    for secret in (JWT, "abc.def", "SECRETVALUE", "r-123", "opaque-456"):
        assert secret not in text


def test_event_lines_are_json_and_redacted() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, f"oops {JWT}", None, None)
    record.detail = f"Bearer {JWT}"
    assert ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert JWT not in json.dumps(line)
    assert line["event"].startswith("oops")


def access_context(request_id: str, **fields: Any) -> RequestContext:
    return RequestContext(request_id=request_id, route="api", **fields)


async def test_access_lines_are_written_in_batches_and_redact_paths() -> None:
    stream = io.StringIO()
    access = AccessLog(LogSettings(), stream)
    access.write(access_context("rid-1"), "GET", "/api/x", 200, 0.0012)
    access.write(access_context("rid-2", subject="alice"), "GET", f"/cb/{JWT}", 401, 0.002)
    assert stream.getvalue() == ""  # nothing written on the request's own path
    access.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["rid-1", "rid-2"]
    assert lines[0] == {
        "time": lines[0]["time"],
        "level": "info",
        "logger": "tokengate.access",
        "event": "access",
        "request_id": "rid-1",
        "route": "api",
        "method": "GET",
        "path": "/api/x",
        "status": 200,
        "duration_ms": 1.2,
        "auth": "-",
        "outcome": "ok",
    }
    assert JWT not in lines[1]["path"]
    assert lines[1]["subject_hash"] == hash_subject("alice") != "alice"


async def test_pending_access_lines_are_flushed_by_the_timer_or_when_many() -> None:
    stream = io.StringIO()
    access = AccessLog(LogSettings(), stream, flush_after_s=0)
    access.write(access_context("rid-1"), "GET", "/", 200, 0.001)
    assert stream.getvalue() == ""
    await asyncio.sleep(0)  # the timer is due at once: the next loop iteration writes
    await asyncio.sleep(0)
    assert stream.getvalue().count("\n") == 1
    batch = AccessLog(LogSettings(), io.StringIO())
    for i in range(512):
        batch.write(access_context(f"r{i}"), "GET", "/", 200, 0.001)
    assert batch._stream is not None
    assert batch._stream.getvalue().count("\n") == 512  # a full batch goes out at once


async def test_a_client_path_cannot_break_the_json_line() -> None:
    stream = io.StringIO()
    access = AccessLog(LogSettings(), stream)
    access.write(access_context("r"), 'GE"T', '/a"b\\c\u2028\x01', 200, 0.001)
    access.close()
    line = json.loads(stream.getvalue())
    assert (line["method"], line["path"]) == ('GE"T', '/a"b\\c\u2028\x01')

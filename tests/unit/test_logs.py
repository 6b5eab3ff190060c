"""Logging: redaction of credentials, and the batched access line."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from gateway.logs import AccessLog, ContextFilter, JsonFormatter, redact
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


async def test_access_lines_are_batched_per_loop_iteration_and_redact_paths() -> None:
    stream = io.StringIO()
    access = AccessLog(LogSettings(), stream)
    access.write("rid-1", "api", {"method": "GET", "path": "/api/x", "status": 200})
    access.write("rid-2", "api", {"method": "GET", "path": f"/cb/{JWT}", "status": 401})
    assert stream.getvalue() == ""  # nothing written on the request's own path
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["rid-1", "rid-2"]
    assert lines[0]["event"] == "access"
    assert lines[0]["path"] == "/api/x"
    assert JWT not in lines[1]["path"]

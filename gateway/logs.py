"""Logging: one JSON (or text) formatter, the request context on every line, redaction.

Installed once by ``configure_logging``. Events are named (``refresh``, ``login``,
``jwks_fetch``) with key/value fields in ``extra``. The redaction filter is the last line of
defence: code never logs a token, and a JWT, a Bearer value or a cookie that slipped into a
line anyway is replaced before the line is written.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import sys
import time
from typing import Any, TextIO

from gateway.context import RequestContext, current
from gateway.settings import LogSettings

# SECURITY: shapes of credentials: JWS/JWE compact serialisations, Bearer values, cookies.
_REDACT = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_.-]*"), "[jwt]"),
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"(?i)(cookie:?\s*)[^\s;]+=[^\s;]+"), r"\1[redacted]"),
    (
        re.compile(r"(?i)((?:refresh|access|id)_?token[\"']?\s*[:=]\s*[\"']?)[^\"'\s,&}]+"),
        r"\1[redacted]",
    ),
)
_MAY_HOLD_CREDENTIAL = re.compile(r"eyJ|(?i:token|secret|password|code)[=:]")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def redact(text: str) -> str:
    for pattern, replacement in _REDACT:
        text = pattern.sub(replacement, text)
    return text


class ContextFilter(logging.Filter):
    """Adds the request context's fields and redacts every string the record carries."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current()
        if ctx is not None:
            record.request_id = ctx.request_id
            if ctx.route != "-":
                record.route = ctx.route
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        record.msg = redact(str(record.msg))
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.msg,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
            line["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD)
        base = f"{self.formatTime(record)} {record.levelname:<7} {record.name} {record.msg}"
        text = f"{base} {fields}".rstrip()
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + redact(self.formatException(record.exc_info))
        return text


def configure_logging(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # aiohttp's own access log is replaced by ours (ingress writes one line per request).
    logging.getLogger("aiohttp.access").disabled = True


class AccessLog:
    """One line per request, built as text directly (no LogRecord, no dict) and written in
    batches: at most every ``flush_after_s``, or at once when ``_MAX_PENDING`` lines wait.
    The access line is the only logging on the hot path; written per request, it cost 10 %
    of the throughput (``bench/run.py --no-access-log`` against the default).

    Fields are structured values we chose; only the path can carry client text, and it is
    redacted when it looks like it holds a credential. ``close()`` (the app's cleanup)
    writes what is still pending.
    """

    def __init__(
        self, settings: LogSettings, stream: TextIO | None = None, *, flush_after_s: float = 0.1
    ) -> None:
        self._stream = stream
        self._json = settings.format == "json"
        self._log_subject = settings.log_subject
        self._flush_after_s = flush_after_s
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    def write(
        self, ctx: RequestContext, method: str, path: str, status: int, duration_s: float
    ) -> None:
        millis = time.time_ns() // 1_000_000
        second = millis // 1000
        if second != self._second:  # formatting a timestamp costs more than the rest
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = self._second_text + _MILLIS[millis % 1000]
        # The pattern needs one of these, and three substring tests cost a tenth of it.
        if ("=" in path or ":" in path or "eyJ" in path) and _MAY_HOLD_CREDENTIAL.search(path):
            path = redact(path)
        subject = ctx.subject
        subject_key = "subject"
        if subject is not None and not self._log_subject:
            subject_key, subject = "subject_hash", hash_subject(subject)
        trace = ctx.trace
        upstream_s = ctx.upstream_s
        # One string built once: the optional fields first, small, then the line around them.
        if self._json:
            optional = (
                ""
                if trace is None
                else f',"trace_id":"{trace.trace_id_hex}","span_id":"{trace.span_id_hex}"'
            )
            if upstream_s is not None:
                optional += f',"upstream_ms":{upstream_s * 1000:.3f}'
            if subject is not None:
                optional += f',"{subject_key}":{_quote(subject)}'
            line = (
                f'{{"time":"{stamp}","level":"info","logger":"tokengate.access",'
                f'"event":"access","request_id":{_quote(ctx.request_id)},'
                f'"route":{_quote(ctx.route)},"method":{_quote(method)},'
                f'"path":{_quote(path)},"status":{status},"duration_ms":{duration_s * 1000:.3f},'
                f'"auth":{_quote(ctx.auth_mode)},"outcome":{_quote(ctx.outcome)}{optional}}}'
            )
        else:
            optional = (
                ""
                if trace is None
                else f" trace_id={trace.trace_id_hex} span_id={trace.span_id_hex}"
            )
            if upstream_s is not None:
                optional += f" upstream_ms={upstream_s * 1000:.3f}"
            if subject is not None:
                optional += f" {subject_key}={subject}"
            line = (
                f"{stamp} INFO    tokengate.access access request_id={ctx.request_id} "
                f"route={ctx.route} method={method} path={path} status={status} "
                f"duration_ms={duration_s * 1000:.3f} auth={ctx.auth_mode} outcome={ctx.outcome}"
                f"{optional}"
            )
        pending = self._pending
        pending.append(line)
        if len(pending) >= _MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_after_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        stream = self._stream or sys.stderr
        stream.write("\n".join(self._pending) + "\n")
        stream.flush()
        self._pending.clear()

    def close(self) -> None:
        self.flush()


_MAX_PENDING = 512
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a timestamp's tail, by millisecond
# json.dumps of one string, without the generic machinery around it.
_quote = json.encoder.encode_basestring_ascii


@functools.lru_cache(maxsize=4096)
def hash_subject(subject: str) -> str:
    """Who, without saying who: enough to follow one user through the log."""
    return hashlib.sha256(subject.encode()).hexdigest()[:16]

"""Logging: one JSON (or text) formatter, the request context on every line, redaction.

Installed once by ``configure_logging``. Events are named (``refresh``, ``login``,
``jwks_fetch``) with key/value fields in ``extra``. The redaction filter is the last line of
defence: code never logs a token, and a JWT, a Bearer value or a cookie that slipped into a
line anyway is replaced before the line is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from gateway.context import current
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

"""JSON replies of token APIs: the bounded read of one, its strict parse, dotted paths
into it (``data.accessToken``, ``items.0.id``) to read a value or drop one, walks that visit
or drop every value without touching the original, and the shapes that show a token inside
a string (a JWT, an opaque run).

Shared by the JSON refresh dialect (``idp.json_dialect``) and token capture
(``bff.capture``); what a path means, and what to drop, is their business. All but
``read_limited`` are pure.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
from collections.abc import AsyncIterable, Callable, Iterator
from itertools import islice
from typing import Any

# "absent" and "null" differ to a caller that must tell a missing field from a JSON null.
MISSING: Any = object()
MAX_JSON_REPLY_BYTES = 1024 * 1024  # a token reply is a few KiB; more is not one
# A token reply is a few levels deep. The walks below recurse once per level, so a strictly
# parsed reply never nests deeper than this (json.loads alone stops near 1,000 levels).
MAX_JSON_DEPTH = 64
# Runs that may hold a JWT (segments and dots; '=' for padding and for "name=<jwt>"), and
# opaque-token-like runs (RFC 6750 §2.1 b64token). Both are linear scans: every match
# consumes its run.
_DOTTED_RUN = re.compile(r"[A-Za-z0-9_=.-]+")
_B64TOKEN_RUN = re.compile(r"[A-Za-z0-9._~+/-]{20,}")
# Where a JOSE header may start: the base64url of "{" then '"' or whitespace. The smallest
# header, {"alg":"none"}, is 19 characters; shorter ones are not decoded, and at most a few
# starts per segment are, so a run of "ey" or "ey." costs no decode each.
_JOSE_START = re.compile(r"e[wy]")
_MIN_HEADER_CHARS = 16
_JOSE_STARTS_TRIED = 8
_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"[0-9]")


async def read_limited(chunks_in: AsyncIterable[bytes], limit_bytes: int) -> bytes | None:
    """The whole body, or None once it exceeds ``limit_bytes``."""
    chunks: list[bytes] = []
    received = 0
    async for chunk in chunks_in:
        received += len(chunk)
        if received > limit_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_reply(raw: bytes) -> Any:
    """The JSON value of a reply body, or None when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return None


def parse_json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object a reply body is, read strictly (RFC 8259), or None: for any other
    JSON value, for text before or after it (an XSSI prefix ``)]}'``, a second document),
    for ``NaN`` and ``Infinity`` (no JSON, though Python's parser takes them), and for
    nesting deeper than ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError both
        return None
    if not isinstance(value, dict) or _nests_deeper(value, MAX_JSON_DEPTH):
        return None
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _nests_deeper(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def split_path(dotted: str) -> tuple[str, ...]:
    """``"data.accessToken"`` -> ``("data", "accessToken")``; empty segments are refused."""
    parts = tuple(dotted.split("."))
    if not dotted or any(part == "" for part in parts):
        raise ValueError(f"not a dotted path: {dotted!r}")
    return parts


def _step(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key, MISSING)
    if isinstance(node, list) and key.isdigit():
        index = int(key)
        return node[index] if index < len(node) else MISSING
    return MISSING


def value_at(data: Any, dotted: str, default: Any = None) -> Any:
    """The value at ``dotted`` in ``data`` (objects by key, arrays by index), or ``default``
    when any step is missing. A JSON null is returned as None, like a missing value, unless
    ``default`` is ``MISSING``."""
    node = data
    for key in split_path(dotted):
        node = _step(node, key)
        if node is MISSING:
            return default
    return node


def remove_path(data: Any, dotted: str) -> tuple[Any, bool]:
    """``data`` without the value at ``dotted``, and whether there was one to remove.

    The containers along the path are copied; ``data`` itself is never changed.
    """
    keys = split_path(dotted)
    parent = data
    for key in keys[:-1]:
        parent = _step(parent, key)
        if parent is MISSING:
            return data, False
    last = keys[-1]
    if isinstance(parent, dict):
        present = last in parent
    else:
        present = isinstance(parent, list) and last.isdigit() and int(last) < len(parent)
    if not present:
        return data, False
    result = copy.copy(data)
    node = result
    for key in keys[:-1]:
        index: Any = int(key) if isinstance(node, list) else key
        child = copy.copy(node[index])
        node[index] = child
        node = child
    del node[int(last) if isinstance(node, list) else last]
    return result, True


def remove_members(data: Any, drop: Callable[[str, Any], bool]) -> tuple[Any, bool]:
    """``data`` without every object member, at any depth, for which ``drop(name, value)``
    is true; and whether anything was removed. Unchanged parts are shared, not copied."""
    if isinstance(data, dict):
        removed = False
        kept: dict[str, Any] = {}
        for key, value in data.items():
            if drop(key, value):
                removed = True
                continue
            kept[key], child_removed = remove_members(value, drop)
            removed = removed or child_removed
        return (kept, True) if removed else (data, False)
    if isinstance(data, list):
        results = [remove_members(item, drop) for item in data]
        if any(changed for _, changed in results):
            return [item for item, _ in results], True
        return data, False
    return data, False


def members_in(data: Any) -> Iterator[tuple[str, Any]]:
    """Every object member in ``data`` as ``(name, value)``, at any depth."""
    if isinstance(data, dict):
        for name, value in data.items():
            yield name, value
            yield from members_in(value)
    elif isinstance(data, list):
        for item in data:
            yield from members_in(item)


def strings_in(data: Any) -> Iterator[str]:
    """Every string value in ``data`` (``data`` itself if it is one), at any depth; not the
    names of members."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict | list):
        for child in data.values() if isinstance(data, dict) else data:
            yield from strings_in(child)


def remove_scalars(data: Any, drop: Callable[[Any], bool]) -> Any:
    """``data`` without every object member whose name or scalar value ``drop`` picks, and
    every array element that is such a scalar, at any depth (``drop`` sees names and scalars,
    never objects or arrays). Containers are rebuilt; ``data`` itself is never changed."""
    if isinstance(data, dict):
        return {
            name: remove_scalars(value, drop)
            for name, value in data.items()
            if not drop(name) and (isinstance(value, dict | list) or not drop(value))
        }
    if isinstance(data, list):
        return [
            remove_scalars(item, drop)
            for item in data
            if isinstance(item, dict | list) or not drop(item)
        ]
    return data


def holds_jwt(text: str) -> bool:
    """Whether ``text`` holds a compact JWS or JWE (RFC 7515 §7.1, RFC 7516 §7.1): at least
    three base64url segments joined by dots, the first a JSON object (a JOSE header, whose
    base64url starts ``ey`` or ``ew``), wherever it starts (``Bearer <jwt>``, ``x=<jwt>``,
    even glued to other letters). Pure."""
    for run in _DOTTED_RUN.finditer(text):
        for segment in run.group().split(".")[:-2]:
            if len(segment) < _MIN_HEADER_CHARS:
                continue
            starts = islice(_JOSE_START.finditer(segment), _JOSE_STARTS_TRIED)
            if any(
                len(segment) - start.start() >= _MIN_HEADER_CHARS
                and _is_json_object(segment[start.start() :].rstrip("="))
                for start in starts
            ):
                return True
    return False


def _is_json_object(segment: str) -> bool:
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return isinstance(json.loads(decoded), dict)
    except (binascii.Error, ValueError, RecursionError):
        return False


def holds_opaque_token(text: str) -> bool:
    """Whether ``text`` holds 20 or more b64token characters in a row (RFC 6750 §2.1) with
    at least one letter and one digit: what an opaque token looks like. Pure."""
    return any(
        _LETTER.search(run.group()) and _DIGIT.search(run.group())
        for run in _B64TOKEN_RUN.finditer(text)
    )

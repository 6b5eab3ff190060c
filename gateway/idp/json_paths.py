"""JSON replies of token APIs: the bounded read of one, and dotted paths into it
(``data.accessToken``, ``items.0.id``) to read a value or drop one without touching the
original.

Shared by the JSON refresh dialect (``idp.json_dialect``) and token capture
(``sessions.capture``); what a path means is their configuration's business. All but
``read_limited`` are pure.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterable, Callable
from typing import Any

# "absent" and "null" differ to a caller that must tell a missing field from a JSON null.
MISSING: Any = object()
MAX_JSON_REPLY_BYTES = 1024 * 1024  # a token reply is a few KiB; more is not one


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


def parse_path(data: Any, dotted: str, default: Any = None) -> Any:
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

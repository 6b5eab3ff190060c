"""The process's peak resident memory, for tests that bound what streaming buffers."""

from __future__ import annotations

import re
from pathlib import Path


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing "5" resets VmHWM to the current RSS, so an earlier, higher
    peak of the same process (a previous test) cannot hide this one's."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) * 1024

"""Running ``wrk --latency`` and parsing what it prints.

Only req/s, the request count, the 50th/99th latency percentiles and the error counts
are kept. Latencies are returned in milliseconds whatever unit wrk chose.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from procs import BenchError

WRK = "/usr/bin/wrk"
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_NEXT_INDEX = re.compile(r"^next-index: (\d+)$", re.MULTILINE)  # from lua/pick_header.lua
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    next_index: int | None = None  # where lua/pick_header.lua stopped

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def parse_wrk(output: str) -> WrkResult:
    """The numbers of one ``wrk --latency`` run; ``BenchError`` if they are missing."""
    percentiles = {p: float(v) * _UNITS_MS[u] for p, v, u in _PERCENTILE.findall(output)}
    rps, total = _RPS.search(output), _TOTAL.search(output)
    if rps is None or total is None or set(percentiles) != {"50", "99"}:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET.search(output)
    next_index = _NEXT_INDEX.search(output)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        next_index=int(next_index.group(1)) if next_index else None,
    )


def run_wrk(
    url: str,
    *,
    duration_s: float,
    threads: int,
    connections: int,
    extra: Sequence[str] = (),
    script_args: Sequence[str] = (),
) -> WrkResult:
    """One bounded wrk run against a loopback ``url``."""
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"refusing a non-loopback target {url}")
    argv = [
        WRK,
        "--latency",
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        *extra,
        url,
    ]
    if script_args:
        argv += ["--", *script_args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(argv[:6])} {url}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)

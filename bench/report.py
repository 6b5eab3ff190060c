"""Turning runs into tables: medians over rounds, ratios taken within each round.

Every number in a table is the median over rounds. A ratio (``x nginx``, ``x floor``,
``x floor-http1``, ``x floor, same request``, ``x bearer``, added latency) is computed in
each round against the reference measured in that same round, then the median of those is
taken, so slow drift of the machine cancels out.
Tables are Markdown; :func:`render` makes the report printed and written to RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from seed import Footprint
from storm import MARGIN_MS, StormRound
from targets import BY_NAME
from wrk import WrkResult


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run of one target in one round."""

    target: str
    round: int
    wrk: WrkResult
    cpu_s: float | None  # the target's process tree, None for the bare origin
    # wrk's and the origin's CPU in the same run: what shares the cores with the target
    others_cpu_s: float | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_s is None or not self.wrk.requests:
            return None
        return self.cpu_s * 1e6 / self.wrk.requests

    @property
    def others_us_per_request(self) -> float | None:
        if self.others_cpu_s is None or not self.wrk.requests:
            return None
        return self.others_cpu_s * 1e6 / self.wrk.requests


Runs = dict[str, list[Run]]  # target name -> its runs, one per round


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_round(
    runs: Runs, target: str, reference: str, combine: Callable[[Run, Run], float]
) -> float | None:
    """Median over rounds of ``combine(run, reference run of the same round)``."""
    if target not in runs or reference not in runs:
        return None
    refs = {r.round: r for r in runs[reference]}
    return median([combine(r, refs[r.round]) for r in runs[target] if r.round in refs])


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The reference of the session target (issue: session >= 0.85x bearer, cache warm).
BEARER = "tg-bearer-warm"
# The floor on tokengate's own upstream client (gateway.http1): every row is also given
# against it, in throughput (x floor-http1) and latency (+p50 ms vs floor-http1).
FLOOR_HTTP1 = "floor-http1"


def rps_ratio(run: Run, ref: Run) -> float:
    return run.wrk.rps / ref.wrk.rps


def throughput_table(by_body: dict[str, Runs], peak_rss_kib: dict[tuple[str, str], int]) -> str:
    header = [
        "body",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "peak RSS MiB",
        "x nginx",
        "x floor",
        f"x {FLOOR_HTTP1}",
        "x floor, same request",
        "x bearer",
        "errors",
    ]
    rows = []
    for body, runs in by_body.items():
        for target, target_runs in runs.items():
            rss = peak_rss_kib.get((body, target))
            rows.append(
                [
                    body,
                    target,
                    fmt(median([r.wrk.rps for r in target_runs]), 0),
                    fmt(median([r.wrk.p50_ms for r in target_runs])),
                    fmt(median([r.wrk.p99_ms for r in target_runs])),
                    fmt(median([r.cpu_us_per_request for r in target_runs]), 0),
                    fmt(rss / 1024 if rss else None, 1),
                    fmt(per_round(runs, target, "nginx", rps_ratio)),
                    fmt(per_round(runs, target, "floor", rps_ratio)),
                    fmt(per_round(runs, target, FLOOR_HTTP1, rps_ratio)),
                    fmt(per_round(runs, target, BY_NAME[target].floor, rps_ratio)),
                    fmt(per_round(runs, target, BEARER, rps_ratio) if target != BEARER else None),
                    str(sum(r.wrk.errors for r in target_runs)),
                ]
            )
    return table(header, rows)


def traces_table(target: str, requests: int, sink: dict[str, int], sink_cpu_s: float) -> str:
    """What the OTLP sink received from the span-recording targets, against the requests
    wrk sent them (warm-up included; the requests in flight when a run stops, which wrk
    does not count, one probe per instance and tokengate's own discovery and JWKS fetches
    add a few spans). Each request makes a server and a client span, so
    2.00 spans per request is every span exported; fewer is spans the SDK dropped. The
    sink's CPU (since it was ready) shares the cores and is in no target's CPU µs/req."""
    header = [
        "target",
        "requests sent",
        "spans received",
        "spans/request",
        "export requests",
        "KiB received",
        "sink CPU µs/request",
        "malformed",
    ]
    row = [
        target,
        f"{requests:,}",
        f"{sink['spans']:,}",
        fmt(sink["spans"] / requests if requests else None),
        f"{sink['requests']:,}",
        fmt(sink["bytes"] / 1024, 0),
        fmt(sink_cpu_s * 1e6 / requests if requests else None, 0),
        str(sink["malformed"]),
    ]
    return table(header, [row])


def p50_added(run: Run, ref: Run) -> float:
    return run.wrk.p50_ms - ref.wrk.p50_ms


def p99_added(run: Run, ref: Run) -> float:
    return run.wrk.p99_ms - ref.wrk.p99_ms


def latency_table(runs: Runs, body: str, baseline: str = "origin") -> str:
    header = [
        "body",
        "target",
        "p50 ms",
        "p99 ms",
        f"+p50 ms vs {baseline}",
        f"+p99 ms vs {baseline}",
        f"+p50 ms vs {FLOOR_HTTP1}",
        "errors",
    ]
    rows = []
    for target, target_runs in runs.items():
        rows.append(
            [
                body,
                target,
                fmt(median([r.wrk.p50_ms for r in target_runs]), 3),
                fmt(median([r.wrk.p99_ms for r in target_runs]), 3),
                fmt(per_round(runs, target, baseline, p50_added), 3),
                fmt(per_round(runs, target, baseline, p99_added), 3),
                fmt(per_round(runs, target, FLOOR_HTTP1, p50_added), 3),
                str(sum(r.wrk.errors for r in target_runs)),
            ]
        )
    return table(header, rows)


@dataclass(frozen=True, slots=True)
class WorkerMemory:
    requests: int
    rss_kib: tuple[int, ...]  # VmRSS of each worker after ``requests``
    hwm_kib: tuple[int, ...]  # VmHWM of each worker
    early_requests: int = 0  # a tenth of the way: RSS then, to show it stays flat
    early_rss_kib: tuple[int, ...] = ()


def _rss(kib: tuple[int, ...], requests: int) -> str:
    return " / ".join(f"{k / 1024:.1f}" for k in kib) + f" ({requests:,})" if kib else "-"


def scaling_ceiling(
    one_worker_us: float | None, others_us: float | None, cores: int
) -> float | None:
    """The most N workers can do over one on ``cores`` cores shared with the load generator
    and the origin: one worker is held to one core (1/x requests a second), N to all the
    cores less the others' share (cores/(x+y)), so the ratio is at most cores*x/(x+y)."""
    if one_worker_us is None or others_us is None:
        return None
    return cores * one_worker_us / (one_worker_us + others_us)


def scaling_table(
    runs: Runs, memory: dict[str, WorkerMemory], body: str, reference: str, cores: int
) -> str:
    one_worker_us = median([r.cpu_us_per_request for r in runs.get(reference, [])])
    header = [
        "body",
        "target",
        "req/s",
        "x 1 worker",
        f"{cores}-core ceiling",
        "p99 ms",
        "CPU µs/req",
        "wrk+origin CPU µs/req",
        "RSS/worker MiB after 1/10 (sent)",
        "RSS/worker MiB at the end (sent)",
        "peak/worker MiB",
        "errors",
    ]
    rows = []
    for target, target_runs in runs.items():
        mem = memory.get(target)
        others_us = median([r.others_us_per_request for r in target_runs])
        ceiling = None if target == reference else scaling_ceiling(one_worker_us, others_us, cores)
        rows.append(
            [
                body,
                target,
                fmt(median([r.wrk.rps for r in target_runs]), 0),
                fmt(per_round(runs, target, reference, rps_ratio)),
                fmt(ceiling),
                fmt(median([r.wrk.p99_ms for r in target_runs])),
                fmt(median([r.cpu_us_per_request for r in target_runs]), 0),
                fmt(others_us, 0),
                _rss(mem.early_rss_kib, mem.early_requests) if mem else "-",
                _rss(mem.rss_kib, mem.requests) if mem else "-",
                " / ".join(f"{k / 1024:.1f}" for k in mem.hwm_kib) if mem else "-",
                str(sum(r.wrk.errors for r in target_runs)),
            ]
        )
    return table(header, rows)


def storm_table(rounds: Sequence[StormRound], target: str) -> str:
    """One row per round, then ``all``: counts summed, times the median over rounds (max:
    the largest), and whether every round met p99 <= IdP token latency + the margin."""
    header = [
        "round",
        "target",
        "requests",
        "200s",
        "refresh grants",
        "IdP token ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "no-refresh p99 ms",
        "p99 - IdP ms",
        f"p99 <= IdP + {MARGIN_MS:.0f} ms",
        "errors",
    ]

    def verdict(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "NO")

    def over_idp(r: StormRound) -> float | None:
        idp = r.idp_latency_ms
        return None if idp is None else r.percentile(99) - idp

    rows = [
        [
            str(r.round + 1),
            target,
            str(r.requests),
            str(r.ok),
            str(r.grants),
            fmt(r.idp_latency_ms, 1),
            fmt(r.percentile(50), 1),
            fmt(r.percentile(99), 1),
            fmt(r.percentile(100), 1),
            fmt(r.baseline_p99_ms, 1),
            fmt(over_idp(r), 1),
            verdict(r.within_target),
            str(r.requests - r.ok),
        ]
        for r in rounds
    ]
    if len(rounds) > 1:
        verdicts = [r.within_target for r in rounds]
        rows.append(
            [
                "all",
                target,
                str(sum(r.requests for r in rounds)),
                str(sum(r.ok for r in rounds)),
                str(sum(r.grants for r in rounds)),
                fmt(median([r.idp_latency_ms for r in rounds]), 1),
                fmt(median([r.percentile(50) for r in rounds]), 1),
                fmt(median([r.percentile(99) for r in rounds]), 1),
                fmt(max(r.percentile(100) for r in rounds), 1),
                fmt(median([r.baseline_p99_ms for r in rounds]), 1),
                fmt(median([over_idp(r) for r in rounds]), 1),
                verdict(None if None in verdicts else all(verdicts)),
                str(sum(r.requests - r.ok for r in rounds)),
            ]
        )
    return table(header, rows)


def sessions_table(footprint: Footprint) -> str:
    """What one bench session costs Redis."""
    f = footprint
    header = ["what", "key", "bytes"]
    rows = [
        ["session HASH, MEMORY USAGE", f"`{f.session_key}`", f"{f.session_bytes:,}"],
        ["subject index SET, MEMORY USAGE", f"`{f.index_key}`", f"{f.index_bytes:,}"],
        [
            f"used_memory growth / session ({f.sessions:,} seeded)",
            "all keys",
            f"{f.used_memory_per_session:,.0f}",
        ],
        ["session JSON, sealed (in the HASH)", "", f"{f.json_bytes:,} / {f.sealed_bytes:,}"],
        [
            "access token / refresh token",
            "",
            f"{f.access_token_bytes:,} / {f.refresh_token_bytes:,}",
        ],
    ]
    return table(header, rows)


def render(
    sections: Sequence[tuple[str, str]],
    *,
    command: str,
    access_log: bool,
    notes: Sequence[tuple[str, str]],
) -> str:
    """The whole report: when, how, on what, then one titled table per section."""
    lines = [
        "# tokengate benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- tokengate: {git_revision()}, access log {'on' if access_log else 'off'}",
        "",
    ]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    lines.append("Targets:")
    lines += [f"- `{name}`: {note}" for name, note in notes]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (
        f"{os.cpu_count()} x {cpu}, Linux {platform.release()}, Python {platform.python_version()}"
    )


def git_revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return done.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    return revision + (" (dirty tree)" if git("status", "--porcelain", "--", "gateway") else "")

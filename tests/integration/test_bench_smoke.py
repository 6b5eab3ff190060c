"""The benchmark harness (bench/run.py --smoke) starts every target and each answers 200s;
its small refresh storm gets every request answered 200 with one refresh grant; the
introspection target's opaque token is introspected once (then cache hits), and the DPoP
target's proofs are signed for its run; the three tracing rows run with tracing off, the
default (propagation) and the SDK at 100 %, whose spans reach the bench's OTLP sink; the
floor on tokengate's own upstream client (floor-http1) runs, and every row is reported
against it (x floor-http1, +p50 ms vs floor-http1: medians of per-round figures)."""

from __future__ import annotations

import importlib
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import parse_settings

# nginx, wrk and redis-server come from Debian; `make test` installs them
# (scripts/ensure-system-deps.sh), so a missing one fails here rather than skipping.
pytestmark = [pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
STORM = "tg-refresh-storm"
INTROSPECT = "tg-introspect-warm"
DPOP = "tg-dpop"
TRACE_OFF, TRACE_DEFAULT, TRACE_SDK = "tg-bearer-trace-off", "tg-bearer-warm", "tg-bearer-trace-sdk"
FLOOR_HTTP1 = "floor-http1"
TIMEOUT_S = 90


def bench_module(name: str) -> Any:
    """A module of bench/. bench/ is on sys.path only for the import: it holds a
    ``profile.py``."""
    bench = str(REPO_ROOT / "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)


def bench_targets() -> Any:
    """bench/targets.py, the harness's own table."""
    return bench_module("targets")


def throughput_targets() -> tuple[str, ...]:
    """The harness's own list, so a target added there is checked here."""
    names: tuple[str, ...] = bench_targets().THROUGHPUT
    return names


def run_smoke() -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--smoke"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the driver stops its servers on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"bench/run.py --smoke took over {TIMEOUT_S}s\n{stderr[-3000:]}")
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def smoke() -> tuple[int, str, str]:
    """One smoke run (~25 s) for every test here."""
    return run_smoke()


def table_rows(report: str) -> dict[str, list[str]]:
    """Rows of the Markdown tables, by their target column."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and cells[1] != "target":
            rows[cells[1]] = cells
    return rows


def test_smoke_run_gets_200s_from_every_target(smoke: tuple[int, str, str]) -> None:
    code, stdout, stderr = smoke

    assert code == 0, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr[-3000:]}"
    rows = table_rows(stdout)
    for target in throughput_targets():
        assert target in rows, f"no row for {target} in:\n{stdout}"
        assert rows[target][-1] == "0", f"{target} had errors: {rows[target]}"
        assert float(rows[target][2].replace(",", "")) > 0, f"{target}: no req/s"
    storm = rows.get(STORM)
    assert storm is not None, f"no refresh-storm row in:\n{stdout}"
    requests, answered_200, grants = storm[2:5]
    assert int(requests) > 0
    assert answered_200 == requests, f"not every storm request got a 200: {storm}"
    assert grants == "1", f"a storm round must make exactly one refresh grant: {storm}"


def test_smoke_run_introspects_once_and_signs_proofs_per_run(
    smoke: tuple[int, str, str],
) -> None:
    code, stdout, stderr = smoke

    assert code == 0, f"exit {code}\nstderr:\n{stderr[-3000:]}"
    assert {INTROSPECT, DPOP} <= set(throughput_targets())
    # One tokengate instance (one body): one introspection call, the probe's; every other
    # request was a cache hit. The driver fails the run otherwise; this checks it says so.
    calls = re.search(r"^issuer: (\d+) introspection calls \(active (\d+)", stderr, re.M)
    assert calls is not None, stderr[-3000:]
    assert calls.groups() == ("1", "1"), calls.group(0)
    # The warm-up is off in smoke mode: one file of proofs, signed for the one run.
    signed = re.findall(rf"^{DPOP}: signed ([\d,]+) DPoP proofs", stderr, re.M)
    assert len(signed) == 1, stderr[-3000:]
    requests = table_rows(stdout)[DPOP]
    assert float(requests[2].replace(",", "")) > 0
    assert requests[-1] == "0"


def test_tracing_targets_configure_tokengate_as_named() -> None:
    targets = bench_targets()
    sink = "http://127.0.0.1:4318"

    def tracing_of(name: str) -> Any:
        target = targets.BY_NAME[name]
        config = targets.tokengate_config(
            port=8080,
            admin_port=8081,
            origin_url="http://127.0.0.1:8082",
            issuer_url="http://127.0.0.1:8083",
            redis_url=None,
            workers=1,
            access_log=True,
            token_cache_size=1024,
            tracing=target.tracing,
            otlp_url=sink if "otlp" in target.needs else None,
        )
        assert parse_settings(config).routes, name  # tokengate takes the config
        return config.get("tracing")

    assert {TRACE_OFF, TRACE_SDK} <= set(throughput_targets())
    assert {TRACE_OFF, TRACE_SDK} <= set(targets.LATENCY)
    assert tracing_of(TRACE_OFF) == {"propagate": False}
    assert tracing_of(TRACE_DEFAULT) is None  # tokengate's default: propagation only
    assert tracing_of(TRACE_SDK) == {
        "exporter": "otlp_http",
        "endpoint": f"{sink}/v1/traces",
        "sample_ratio": 1.0,
    }
    # The same request to the same route: only tracing differs.
    for name in (TRACE_OFF, TRACE_SDK):
        target = targets.BY_NAME[name]
        default = targets.BY_NAME[TRACE_DEFAULT]
        assert (target.client, target.path, target.floor) == (
            default.client,
            default.path,
            default.floor,
        )


def test_smoke_run_exports_every_span_of_the_sdk_target(smoke: tuple[int, str, str]) -> None:
    code, stdout, stderr = smoke

    assert code == 0, f"exit {code}\nstderr:\n{stderr[-3000:]}"
    rows = table_rows(stdout)
    for name in (TRACE_OFF, TRACE_DEFAULT, TRACE_SDK):
        assert float(rows[name][2].replace(",", "")) > 0, rows[name]
        assert rows[name][-1] == "0", rows[name]
    # The driver reads the sink after the instance stopped (and flushed): a server and a
    # client span per request counted by wrk, and a few more: the requests in flight when
    # wrk stopped (up to its 8 connections), the probe, tokengate's discovery/JWKS fetches.
    sink = re.search(
        rf"^OTLP sink: ([\d,]+) spans in ([\d,]+) export requests .* for ([\d,]+) "
        rf"requests to {TRACE_SDK}: ([\d.]+) spans per request",
        stderr,
        re.M,
    )
    assert sink is not None, stderr[-3000:]
    spans, exports, requests = (int(g.replace(",", "")) for g in sink.groups()[:3])
    assert requests > 0, sink.group(0)
    assert exports > 0, sink.group(0)
    assert 2 * requests <= spans <= 2 * requests + 60, sink.group(0)


def test_smoke_run_reports_every_row_against_floor_http1(smoke: tuple[int, str, str]) -> None:
    code, stdout, stderr = smoke

    assert code == 0, f"exit {code}\nstderr:\n{stderr[-3000:]}"
    target = bench_targets().BY_NAME[FLOOR_HTTP1]
    assert (target.kind, target.client, target.floor_client) == ("floor", "plain", "http1")
    assert FLOOR_HTTP1 in throughput_targets()
    assert FLOOR_HTTP1 in bench_targets().LATENCY
    header = next(
        line for line in stdout.splitlines() if line.startswith("| body") and "req/s" in line
    )
    column = [c.strip() for c in header.strip().strip("|").split("|")].index(f"x {FLOOR_HTTP1}")
    rows = table_rows(stdout)
    assert rows[FLOOR_HTTP1][column] == "1.00", rows[FLOOR_HTTP1]
    for name in throughput_targets():
        assert float(rows[name][column]) > 0, (name, rows[name])


def fake_run(target: str, round_: int, rps: float, p50_ms: float) -> Any:
    wrk = bench_module("wrk").WrkResult(
        rps=rps, requests=int(rps), p50_ms=p50_ms, p99_ms=2 * p50_ms, non_2xx=0, socket_errors=0
    )
    return bench_module("report").Run(target, round_, wrk, 1.0)


def test_floor_http1_columns_are_medians_of_per_round_figures() -> None:
    report = bench_module("report")
    runs = {
        FLOOR_HTTP1: [fake_run(FLOOR_HTTP1, 0, 1000, 0.3), fake_run(FLOOR_HTTP1, 1, 2000, 0.5)],
        "tg-none": [fake_run("tg-none", 0, 900, 0.4), fake_run("tg-none", 1, 1000, 0.9)],
    }
    throughput = report.throughput_table({"200b": runs}, {})
    latency = report.latency_table(runs, "200b")

    def cell(table: str, column: str, target: str) -> str:
        lines = table.splitlines()
        header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
        return table_rows(table)[target][header.index(column)]

    # Per round 0.90 and 0.50: their median, not the ratio of the medians (950 / 1500).
    assert cell(throughput, f"x {FLOOR_HTTP1}", "tg-none") == "0.70"
    assert cell(throughput, f"x {FLOOR_HTTP1}", FLOOR_HTTP1) == "1.00"
    # +0.1 and +0.4 ms per round; the column stands without the origin in the runs.
    assert cell(latency, f"+p50 ms vs {FLOOR_HTTP1}", "tg-none") == "0.250"
    assert cell(latency, f"+p50 ms vs {FLOOR_HTTP1}", FLOOR_HTTP1) == "0.000"
    assert cell(latency, "+p50 ms vs origin", "tg-none") == "-"

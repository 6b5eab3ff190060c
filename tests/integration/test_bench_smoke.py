"""The benchmark harness (bench/run.py --smoke) starts every target and each answers 200s;
its small refresh storm gets every request answered 200 with one refresh grant; the
introspection target's opaque token is introspected once (then cache hits), and the DPoP
target's proofs are signed for its run."""

from __future__ import annotations

import importlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# nginx, wrk and redis-server come from Debian; `make test` installs them
# (scripts/ensure-system-deps.sh), so a missing one fails here rather than skipping.
pytestmark = [pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
STORM = "tg-refresh-storm"
INTROSPECT = "tg-introspect-warm"
DPOP = "tg-dpop"
TIMEOUT_S = 90


def throughput_targets() -> tuple[str, ...]:
    """The harness's own list (bench/targets.py), so a target added there is checked here.
    bench/ is on sys.path only for the import: it holds a ``profile.py``."""
    bench = str(REPO_ROOT / "bench")
    sys.path.insert(0, bench)
    try:
        targets = importlib.import_module("targets")
    finally:
        sys.path.remove(bench)
    names: tuple[str, ...] = targets.THROUGHPUT
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

"""Profile one tokengate target under wrk load, and print where the time goes.

    python bench/profile.py                        # tg-bearer-warm, 200b, 10 s
    python bench/profile.py --target tg-none --native --seconds 20 --keep /tmp/prof.txt
    python bench/profile.py --target tg-session
    python bench/profile.py --target tg-bearer-cold --perf   # C level: µs per request

Starts the origin, the issuer, Redis and its sessions, and the target as ``run.py`` does,
and loads it with wrk (-t2 -c64) meanwhile. By default it samples Python stacks with
``py-spy record --format raw`` (``pip install py-spy``) and prints the functions with the
most samples on top of the stack (self) and anywhere in it (inclusive), as % of the
samples. py-spy stops the process to read it, and a stop takes effect when the process
next leaves the kernel: samples pile up after system calls, so a socket write, or the
``getpid()`` inside Python 3.11's ``asyncio.get_running_loop()``, looks hotter than it is.
``--perf`` samples with ``perf record -e cpu-clock`` instead (Debian's ``linux-perf``;
no hardware counters needed) and prints CPU µs per request by shared object and by
symbol, which is what to compare between two targets.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import BenchError, Processes
from servers import Lab
from targets import BY_NAME
from wrk import WRK


def parse_collapsed(text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(self samples, inclusive samples, total) by ``function (file)`` from py-spy raw output."""
    self_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return self_samples, inclusive, total


def _short(frame: str) -> str:
    # "handle (gateway/proxy.py:27)" -> "handle (gateway/proxy.py)"; keeps the package path.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def py_spy_argv(py_spy: str, pid: int, seconds: int, raw: Path, native: bool) -> list[str]:
    return [
        py_spy,
        "record",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--duration",
        str(seconds),
        "--rate",
        "200",
        "--pid",
        str(pid),
        *(["--native"] if native else []),
    ]


_PERF_HZ = 2000  # samples per CPU-second: one sample is 500 µs of CPU


def perf_argv(perf: str, pid: int, seconds: int, data: Path) -> list[str]:
    # cpu-clock: a software event, so it works in a VM without hardware counters.
    return [perf, "record", "-e", "cpu-clock", "-F", str(_PERF_HZ), "-o", str(data),
            "-p", str(pid), "--", "sleep", str(seconds)]  # fmt: skip


def perf_report(perf: str, data: Path) -> str:
    argv = [perf, "report", "-i", str(data), "-n", "--no-children", "--sort", "dso,sym"]
    argv.append("--stdio")
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


# "  19.48%  3897  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault"
_PERF_LINE = re.compile(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.+)")


def parse_perf(text: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(samples by shared object, by "object symbol") from ``perf report -n --sort dso,sym``."""
    by_dso: collections.Counter[str] = collections.Counter()
    by_symbol: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        match = _PERF_LINE.match(line)
        if match is None:
            continue
        count, dso, symbol = int(match.group(1)), match.group(2), match.group(3).strip()
        dso = dso.split(".cpython")[0].split(".so")[0]
        by_dso[dso] += count
        by_symbol[f"{dso} {symbol}"] += count
    return by_dso, by_symbol


def print_perf(text: str, target: str, body: str, rps_line: str, seconds: int, top: int) -> None:
    by_dso, by_symbol = parse_perf(text)
    rps = float(rps_line.split()[-1]) if rps_line else 0.0
    requests = rps * seconds  # wrk runs before and after the sampled window, at this rate
    per_request = 1e6 / _PERF_HZ / requests if requests else 0.0  # µs of CPU per sample
    total = sum(by_dso.values())
    print(f"{target} {body}: {rps_line.strip()}, {total * per_request:.0f} µs CPU per request")
    for title, counter in (("shared object", by_dso), ("symbol", by_symbol)):
        print(f"\ntop {top} by {title}: µs CPU per request, % of samples")
        for name, count in counter.most_common(top):
            print(f"  {count * per_request:6.1f} µs  {100 * count / total:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tg-bearer-warm")
    parser.add_argument("--body", default="200b")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--perf", action="store_true", help="perf record: C symbols, µs/req")
    parser.add_argument("--keep", type=Path, help="also save the sampler's raw output here")
    args = parser.parse_args()
    if args.perf:
        sampler = shutil.which("perf")
        missing = "perf not found: apt-get install linux-perf"
    else:
        sampler = shutil.which("py-spy", path=str(Path(sys.executable).parent))
        sampler = sampler or shutil.which("py-spy")
        missing = "py-spy not found: pip install py-spy"
    if sampler is None:
        print(missing, file=sys.stderr)
        return 2
    target = BY_NAME.get(args.target)
    if target is None or not target.wrk:
        print(f"{args.target}: not a wrk target", file=sys.stderr)
        return 2
    if target.client == "dpop" and args.seconds + 4 > 45:
        print("--seconds: at most 41 with DPoP (proofs signed before wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tokengate-profile-") as tmp:
        procs = Processes(Path(tmp))
        try:
            lab = Lab(Path(tmp), procs, access_log=True)
            lab.start_origin()
            if "issuer" in target.needs:
                cold = 12_000 if target.client == "bearer-cold" else 0
                lab.start_issuer(cold_tokens=cold, token_latency_ms=0)
            if "redis" in target.needs:
                lab.start_redis()
                lab.seed_sessions(1000)
            if "otlp" in target.needs:
                lab.start_otlp_sink()
            run = lab.start([target], tag="profile")[target.name]
            assert run.proc is not None
            lab.probe(run, args.body)
            seconds = args.seconds + 4
            extra, script_args = lab.client_args(target, 2, run.url(args.body), seconds)
            wrk_argv = [WRK, "-t2", "-c64", f"-d{seconds}s", *extra, run.url(args.body)]
            if script_args:
                wrk_argv += ["--", *script_args]
            raw = Path(tmp) / "profile.txt"
            if args.perf:
                data = Path(tmp) / "perf.data"
                sample_argv = perf_argv(sampler, run.proc.pid, args.seconds, data)
            else:
                sample_argv = py_spy_argv(sampler, run.proc.pid, args.seconds, raw, args.native)
            with subprocess.Popen(wrk_argv, stdout=subprocess.PIPE, text=True) as wrk:
                try:
                    subprocess.run(
                        sample_argv, check=True, capture_output=True, timeout=args.seconds + 30
                    )
                finally:
                    wrk_out, _ = wrk.communicate(timeout=args.seconds + 30)
            if args.perf:
                raw.write_text(perf_report(sampler, data))
            text = raw.read_text()
        except BenchError as exc:
            print(f"profile: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    if args.keep:
        args.keep.write_text(text)
    rps = next((ln for ln in wrk_out.splitlines() if ln.startswith("Requests/sec")), "")
    if args.perf:
        print_perf(text, args.target, args.body, rps, args.seconds, args.top)
        return 0
    self_samples, inclusive, total = parse_collapsed(text)
    print(f"{args.target} {args.body}: {total} samples, {rps.strip()}")
    for title, counter in (("self", self_samples), ("inclusive", inclusive)):
        print(f"\ntop {args.top} by {title} samples:")
        for frame, count in counter.most_common(args.top):
            print(f"  {100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

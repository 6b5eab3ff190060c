"""Profile one tokengate target under wrk load with py-spy, and print where the time goes.

    python bench/profile.py                        # tg-bearer-warm, 200b, 10 s
    python bench/profile.py --target tg-none --native --seconds 20 --keep /tmp/prof.txt
    python bench/profile.py --target tg-session

Starts the origin, the issuer, Redis and its sessions, and the target as ``run.py`` does,
loads it with wrk (-t2 -c64) and samples it with ``py-spy record --format raw`` meanwhile.
Prints the functions with the most samples on top of the stack (self) and anywhere in it
(inclusive), as % of the samples taken. Needs ``pip install py-spy`` in the virtualenv.
"""

from __future__ import annotations

import argparse
import collections
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tg-bearer-warm")
    parser.add_argument("--body", default="200b")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", type=Path, help="also save py-spy's raw output here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    target = BY_NAME.get(args.target)
    if target is None or not target.wrk:
        print(f"{args.target}: not a wrk target", file=sys.stderr)
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
            run = lab.start([target], tag="profile")[target.name]
            assert run.proc is not None
            lab.probe(run, args.body)
            extra, script_args = lab.client_args(target, threads=2)
            wrk_argv = [WRK, "-t2", "-c64", f"-d{args.seconds + 4}s", *extra, run.url(args.body)]
            if script_args:
                wrk_argv += ["--", *script_args]
            raw = Path(tmp) / "profile.txt"
            spy_argv = [
                py_spy,
                "record",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--duration",
                str(args.seconds),
                "--rate",
                "200",
                "--pid",
                str(run.proc.pid),
                *(["--native"] if args.native else []),
            ]
            with subprocess.Popen(wrk_argv, stdout=subprocess.PIPE, text=True) as wrk:
                try:
                    subprocess.run(
                        spy_argv, check=True, capture_output=True, timeout=args.seconds + 30
                    )
                finally:
                    wrk_out, _ = wrk.communicate(timeout=args.seconds + 30)
            text = raw.read_text()
        except BenchError as exc:
            print(f"profile: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    if args.keep:
        args.keep.write_text(text)
    self_samples, inclusive, total = parse_collapsed(text)
    rps = next((ln for ln in wrk_out.splitlines() if ln.startswith("Requests/sec")), "")
    print(f"{args.target} {args.body}: {total} samples, {rps.strip()}")
    for title, counter in (("self", self_samples), ("inclusive", inclusive)):
        print(f"\ntop {args.top} by {title} samples:")
        for frame, count in counter.most_common(args.top):
            print(f"  {100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

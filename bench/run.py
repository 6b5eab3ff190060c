"""The tokengate benchmark (issue #5): tokengate against nginx (the limit) and a bare
aiohttp proxy (the floor), all on loopback, in interleaved rounds.

    python bench/run.py                       # the default run, ~9 minutes on 2 cores
    python bench/run.py --rounds 5 --results bench/RESULTS.md
    python bench/run.py --smoke               # seconds; asserts every target answers 200

Sections: throughput per body size (-t2 -c64), added latency at one connection (-t1 -c1),
the refresh storm (concurrent requests on one expired session, storm.py), what a session
costs Redis, and scaling (workers 1 and 2, RSS per worker after --rss-requests). What a
target is lives in targets.py; starting it in servers.py; sessions in seed.py; tables in
report.py. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import nginx
from procs import (
    BenchError,
    Processes,
    cmdline,
    status_kib,
    tree_cpu_s,
    tree_peak_rss_kib,
    tree_pids,
)
from report import (
    Run,
    Runs,
    WorkerMemory,
    latency_table,
    render,
    scaling_table,
    sessions_table,
    storm_table,
    throughput_table,
    traces_table,
)
from seed import Footprint
from servers import Lab, Running
from storm import MARGIN_MS, StormRound, fire, issuer_stats, storm_round
from targets import BY_NAME, LATENCY, TARGETS, THROUGHPUT, Target
from wrk import run_wrk

STORM_TARGET = "tg-refresh-storm"
STORM_BODY = "200b"
# Proofs are signed (iat) just before a run; tokengate takes them for 60 s (+5 s leeway).
MAX_DPOP_DURATION_S = 45


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per target")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--bodies", default=",".join(nginx.BODIES), help="default 200b,16k,1m")
    p.add_argument("--targets", default=",".join(THROUGHPUT), help="throughput targets")
    p.add_argument(
        "--no-access-log",
        action="store_true",
        help="tokengate with log.access_log: false (default: on, as production)",
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-storm", action="store_true", help="leave out the refresh storm")
    p.add_argument(
        "--sessions",
        type=int,
        default=1000,
        help="sessions seeded in Redis for tg-session (default 1000)",
    )
    p.add_argument("--storm-rounds", type=int, default=5, help="refresh-storm rounds (default 5)")
    p.add_argument(
        "--storm-requests",
        type=int,
        default=200,
        help="concurrent requests per refresh-storm round (default 200)",
    )
    p.add_argument(
        "--token-latency-ms",
        type=float,
        default=50.0,
        help="the issuer's artificial delay per /token answer (default 50)",
    )
    p.add_argument("--scaling-target", default="tg-bearer-warm")
    p.add_argument(
        "--rss-requests",
        type=int,
        default=1_000_000,
        help="requests each scaling instance serves before its RSS is read (default 1000000)",
    )
    p.add_argument(
        "--cold-tokens",
        type=int,
        default=12_000,
        help="distinct tokens for bearer-cold; must exceed the token cache",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="1 round, 1 s per target, 200b only; exit 0 iff all answered 200",
    )
    p.add_argument("--results", type=Path, help="also write the report here (Markdown)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.connections = 1, 1, 0, 8
        args.bodies, args.cold_tokens, args.sessions = "200b", 64, 64
        args.storm_rounds, args.storm_requests = 1, 20
        args.skip_latency = args.skip_scaling = True
    args.bodies = args.bodies.split(",")
    args.targets = args.targets.split(",")
    for name in [*args.targets, args.scaling_target]:
        if name not in BY_NAME:
            p.error(f"unknown target {name}; known: {', '.join(BY_NAME)}")
        if not BY_NAME[name].ready:
            p.error(f"{name}: {BY_NAME[name].note}")
        if not BY_NAME[name].wrk:
            p.error(f"{name} is not a wrk target: it has its own section (see --skip-storm)")
    if BY_NAME[args.scaling_target].client == "dpop":
        p.error("--scaling-target: DPoP proofs are signed per run; fill runs last up to 60 s")
    wrk_targets = [*args.targets, *([] if args.skip_latency else LATENCY)]
    dpop = any(BY_NAME[n].client == "dpop" for n in wrk_targets)
    if dpop and args.duration > MAX_DPOP_DURATION_S:
        p.error(
            f"--duration: at most {MAX_DPOP_DURATION_S} s with DPoP targets (a proof's iat "
            "must stay within tokengate's 60 s)"
        )
    if args.sessions < 1 or args.storm_rounds < 1 or args.storm_requests < 1:
        p.error("--sessions, --storm-rounds and --storm-requests must be at least 1")
    if any(body not in nginx.BODIES for body in args.bodies):
        p.error(f"--bodies: choose from {', '.join(nginx.BODIES)}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, lab: Lab) -> None:
        self.args = args
        self.lab = lab
        self.sent: dict[str, int] = {}  # requests sent to each started target
        self.errors = 0  # non-2xx answers and socket errors, over every run
        self.failures: list[str] = []  # checks that failed besides status codes

    def needed(self) -> list[Target]:
        """Every target this run will start, whatever section it is in."""
        args = self.args
        names = list(args.targets)
        if not args.skip_latency:
            names += LATENCY
        if not args.skip_scaling:
            names.append(args.scaling_target)
        if not args.skip_storm:
            names.append(STORM_TARGET)
        return [BY_NAME[n] for n in dict.fromkeys(names)]

    def run(self) -> str:
        args, lab = self.args, self.lab
        lab.start_origin()
        selected = [BY_NAME[n] for n in args.targets]
        needed = self.needed()
        footprint: Footprint | None = None
        if any("issuer" in t.needs for t in needed):
            cold = any(t.client == "bearer-cold" for t in needed)
            lab.start_issuer(args.cold_tokens if cold else 0, args.token_latency_ms)
        if any("redis" in t.needs for t in needed):
            lab.start_redis()
            footprint = lab.seed_sessions(args.sessions)
        if any("otlp" in t.needs for t in needed):
            lab.start_otlp_sink()
        sections = []
        by_body: dict[str, Runs] = {}
        peak: dict[tuple[str, str], int] = {}
        latency: Runs = {}
        introspecting = 0  # tokengate instances started with an opaque token to introspect
        exporting = False  # a tokengate instance recording spans ran (tracing: sdk)
        for body in args.bodies:
            with_latency = body == args.bodies[0] and not args.skip_latency
            extra = [BY_NAME[n] for n in LATENCY if with_latency and n not in args.targets]
            introspecting += sum(
                t.is_tokengate and t.client == "introspect-warm" for t in selected + extra
            )
            exporting |= any(t.tracing == "sdk" for t in selected + extra)
            running = lab.start(selected + extra, tag=body)
            try:
                group = [running[t.name] for t in selected]
                self.prepare(group, body)
                by_body[body] = self.rounds("throughput", group, body)
                for run in group:
                    assert run.proc is not None
                    peak[(body, run.target.name)] = tree_peak_rss_kib(run.proc.pid)
                if with_latency:
                    lowload = [running[n] for n in LATENCY if n in running]
                    latency = self.rounds("latency", lowload, body, threads=1, connections=1)
            finally:
                self.stop(running)
        if introspecting:
            self.check_introspections(introspecting)
        traces = self.check_traces() if exporting else None
        c, t, d = args.connections, args.threads, args.duration
        sections.append(
            (
                f"Throughput (wrk -t{t} -c{c}, {args.rounds} rounds x {d} s, interleaved)",
                throughput_table(by_body, peak),
            )
        )
        if traces is not None:
            sections.append(
                (
                    "Traces exported (tracing: sdk, sample_ratio 1.0, OTLP/HTTP to the bench's "
                    "sink; counted after the instances stopped and flushed)",
                    traces,
                )
            )
        if latency:
            sections.append(
                (
                    f"Latency at one connection (wrk -t1 -c1, body {args.bodies[0]})",
                    latency_table(latency, args.bodies[0]),
                )
            )
        if not args.skip_storm:
            sections.append(self.storm())
        if footprint is not None:
            sections.append(
                (
                    "Sessions in Redis (bench sessions: access + refresh token, no ID token, "
                    f"one claim; {self.lab.redis_version()})",
                    sessions_table(footprint),
                )
            )
        if not args.skip_scaling:
            sections.append(self.scaling())
        return render(
            sections,
            command=shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
            access_log=not args.no_access_log,
            notes=[(t.name, t.note) for t in TARGETS],
        )

    def check_introspections(self, instances: int) -> None:
        """The opaque token was introspected once per tokengate instance (cache warm for
        every other request), and every call was authenticated and answered active."""
        calls = self.lab.introspections()
        sent = sum(
            n
            for name, n in self.sent.items()
            if name in BY_NAME
            and BY_NAME[name].is_tokengate
            and BY_NAME[name].client == "introspect-warm"
        )
        log(
            f"issuer: {sum(calls.values())} introspection calls (active {calls['active']}, "
            f"inactive {calls['inactive']}, unauthenticated {calls['unauthenticated']}) for "
            f"{sent:,} requests to tokengate with the opaque token, {instances} instance(s)"
        )
        if calls["active"] > instances or calls["inactive"] or calls["unauthenticated"]:
            self.failures.append(
                f"introspection: {calls} at the issuer, expected at most {instances} active "
                "calls (one per instance) and no other"
            )

    def check_traces(self) -> str:
        """The sink received spans from the instances that record them (tracing: sdk), and
        none of the exports was malformed; the table of what it received per request."""
        stats = self.lab.otlp_stats()
        names = [n for n in self.sent if n in BY_NAME and BY_NAME[n].tracing == "sdk"]
        sent = sum(self.sent[n] for n in names)
        cpu_s = self.lab.otlp_cpu_s()
        per_request = stats["spans"] / sent if sent else 0.0
        log(
            f"OTLP sink: {stats['spans']:,} spans in {stats['requests']:,} export requests "
            f"({stats['bytes'] / 1024:,.0f} KiB, {stats['malformed']} malformed) for "
            f"{sent:,} requests to {', '.join(names)}: {per_request:.2f} spans per request; "
            f"sink CPU {cpu_s:.2f} s since it was ready"
        )
        if stats["spans"] == 0 or stats["malformed"]:
            self.failures.append(
                f"traces: the OTLP sink received {stats['spans']} spans "
                f"({stats['malformed']} malformed export requests) from {', '.join(names)}, "
                "expected spans and no malformed request"
            )
        return traces_table(" + ".join(names), sent, stats, cpu_s)

    def prepare(self, group: list[Running], body: str) -> None:
        for run in group:
            self.lab.probe(run, body)
        if self.args.warmup > 0:
            for run in group:
                self.measure(
                    run, body, -1, self.args.threads, self.args.connections, self.args.warmup
                )

    def rounds(
        self,
        section: str,
        group: list[Running],
        body: str,
        *,
        threads: int | None = None,
        connections: int | None = None,
    ) -> Runs:
        threads = threads or self.args.threads
        connections = connections or self.args.connections
        runs: Runs = {run.target.name: [] for run in group}
        for i in range(self.args.rounds):
            for run in group:  # A B C ... A B C ...
                result = self.measure(run, body, i, threads, connections, self.args.duration)
                runs[run.target.name].append(result)
                cpu = result.cpu_us_per_request
                log(
                    f"[{section} {body} {i + 1}/{self.args.rounds}] {run.target.name:<22} "
                    f"{result.wrk.rps:>9,.0f} req/s  p50 {result.wrk.p50_ms:7.2f} ms  "
                    f"p99 {result.wrk.p99_ms:7.2f} ms  "
                    f"cpu {'-' if cpu is None else f'{cpu:.0f}'} µs/req  errors {result.wrk.errors}"
                )
        return runs

    def measure(
        self, run: Running, body: str, round_: int, threads: int, connections: int, duration_s: int
    ) -> Run:
        url = run.url(body)
        extra, script_args = self.lab.client_args(run.target, threads, url, duration_s)
        pid = run.proc.pid if run.proc else None
        before = tree_cpu_s(pid) if pid else None
        others_before = _reaped_cpu_s() + tree_cpu_s(self.lab.origin_pid)
        result = run_wrk(
            url,
            duration_s=duration_s,
            threads=threads,
            connections=connections,
            extra=extra,
            script_args=script_args,
        )
        cpu_s = tree_cpu_s(pid) - before if pid and before is not None else None
        # wrk is a child reaped by run_wrk: its CPU is in RUSAGE_CHILDREN now
        others_s = _reaped_cpu_s() + tree_cpu_s(self.lab.origin_pid) - others_before
        if run.target.client == "dpop":
            self.lab.check_dpop_run(run.target, threads, result.requests, result.next_index)
        elif result.next_index is not None:
            self.lab.advance_cursor(run.target, result.next_index)
        self.sent[run.target.name] = self.sent.get(run.target.name, 0) + result.requests
        self.errors += result.errors
        return Run(run.target.name, round_, result, cpu_s, others_s)

    def scaling(self) -> tuple[str, str]:
        base, body = BY_NAME[self.args.scaling_target], self.args.bodies[0]
        variants = [
            dataclasses.replace(base, name=f"{base.name} workers={n}", workers=n) for n in (1, 2)
        ]
        running = self.lab.start(variants, tag="scaling")
        try:
            group = list(running.values())
            self.sent.clear()
            self.prepare(group, body)
            runs = self.rounds("scaling", group, body)
            memory = {}
            for run in group:
                early = self.fill(run, body, max(1, self.args.rss_requests // 10))
                late = self.fill(run, body, self.args.rss_requests)
                memory[run.target.name] = dataclasses.replace(
                    late, early_requests=early.requests, early_rss_kib=early.rss_kib
                )
        finally:
            self.stop(running)
        title = (
            f"Scaling ({base.name}, body {body}, wrk -t{self.args.threads} "
            f"-c{self.args.connections}; RSS per worker after the requests sent)"
        )
        cores = os.cpu_count() or 1
        return title, scaling_table(runs, memory, body, reference=variants[0].name, cores=cores)

    def fill(self, run: Running, body: str, requests: int) -> WorkerMemory:
        """Send requests until ``requests`` in total, then read each worker's RSS."""
        rps = None
        while (sent := self.sent.get(run.target.name, 0)) < requests:
            left = requests - sent
            chunk_s = 2 if rps is None else min(60, max(1, round(left / rps + 0.5)))
            rps = self.measure(
                run, body, -1, self.args.threads, self.args.connections, chunk_s
            ).wrk.rps
        assert run.proc is not None
        pids = tree_pids(run.proc.pid)
        workers = (
            pids[:1]
            if run.target.workers == 1
            else [p for p in pids[1:] if "spawn_main" in cmdline(p)]
        )
        return WorkerMemory(
            requests=self.sent[run.target.name],
            rss_kib=tuple(status_kib(p, "VmRSS") for p in workers),
            hwm_kib=tuple(status_kib(p, "VmHWM") for p in workers),
        )

    def storm(self) -> tuple[str, str]:
        """Rounds of concurrent requests on a session whose access token has expired."""
        args, lab = self.args, self.lab
        target, n = BY_NAME[STORM_TARGET], args.storm_requests
        running = lab.start([target], tag="storm")
        rounds: list[StormRound] = []
        try:
            run = running[target.name]
            lab.probe(run, STORM_BODY)
            url = run.url(STORM_BODY)
            assert lab.issuer_url is not None
            # A valid session to open the connections with, then a new expired one a round.
            warm_cookie = lab.seed_session("storm-warm", expired=False)
            for i in range(args.storm_rounds):
                cookie = lab.seed_session(f"storm-user-{i}", expired=True)
                before = issuer_stats(lab.issuer_url)
                valid, baseline, storm = fire(
                    url, lab.session_headers(warm_cookie), lab.session_headers(cookie), n
                )
                result = storm_round(i, baseline, storm, before, issuer_stats(lab.issuer_url))
                rounds.append(result)
                if valid.count(200) != len(valid):
                    self.failures.append(
                        f"storm round {i + 1}: the valid session's bursts answered "
                        f"{sorted(set(valid))}, not all 200"
                    )
                self.errors += result.requests - result.ok
                self.failures += [f"storm round {i + 1}: {p}" for p in result.problems]
                log(
                    f"[storm {i + 1}/{args.storm_rounds}] {n} requests: {result.ok} x 200, "
                    f"{result.grants} grant(s), IdP {result.idp_latency_ms or 0:.1f} ms, "
                    f"p50 {result.percentile(50):.1f} ms  p99 {result.percentile(99):.1f} ms  "
                    f"max {result.percentile(100):.1f} ms; "
                    f"no-refresh p99 {result.baseline_p99_ms:.1f} ms"
                )
            if self.failures and run.proc is not None:
                log(run.proc.log_tail())
        finally:
            self.stop(running)
        title = (
            f"Refresh storm ({n} concurrent requests on one session whose access token has "
            f"expired, body {STORM_BODY}, {args.storm_rounds} rounds; issuer /token delay "
            f"{args.token_latency_ms:g} ms; target p99 <= IdP token latency + {MARGIN_MS:.0f} ms)"
        )
        return title, storm_table(rounds, target.name)

    def stop(self, running: dict[str, Running]) -> None:
        for run in running.values():
            if run.proc is not None:
                self.lab.procs.stop(run.proc)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every process


def _reaped_cpu_s() -> float:
    """User + system CPU seconds of this driver's reaped children (wrk runs among them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        procs = Processes(Path(tmp))
        lab = Lab(Path(tmp), procs, access_log=not args.no_access_log)
        bench = Bench(args, lab)
        try:
            report = bench.run()
        except BenchError as exc:
            log(f"bench: {exc}")
            return 1
        finally:
            procs.stop_all()
    print(report, flush=True)
    if args.results:
        args.results.write_text(report)
    log(f"done in {time.monotonic() - started:.0f}s")
    for failure in bench.failures:
        log(f"bench: {failure}")
    if bench.errors:
        log(f"bench: {bench.errors} requests failed (non-2xx or socket errors)")
    return 1 if bench.errors or bench.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

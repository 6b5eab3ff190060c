"""Issue #5: the same bare pass-through proxy on aiohttp's ClientSession and on Http1Pool.

    python bench/http1_compare.py                      # 3 rounds x 5 s, bodies 200b,16k,1m
    python bench/http1_compare.py --rounds 5 --bodies 200b
    python bench/http1_compare.py serve --client http1 --port N --upstream-port M

Both proxies are the floor (``floor.py``, ``--client aiohttp`` and ``--client http1``; the
bench's ``floor`` and ``floor-http1`` rows): uvloop, one pooled client, the body streamed
back, hop-by-hop headers dropped; only the client differs. Behind them is the bench's nginx
origin; wrk (-t2 -c64) loads them in interleaved rounds. Reports req/s, CPU µs/req of each
proxy process and the ratio http1/aiohttp within each round (medians over rounds).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from floor import CLIENTS
from floor import serve as serve_floor


def serve(client: str, port: int, upstream_port: int) -> None:
    serve_floor(client, port, f"http://127.0.0.1:{upstream_port}")


# -- the driver ----------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every process


def measure(args: argparse.Namespace) -> int:
    import nginx
    from procs import (
        LOOPBACK,
        BenchError,
        Processes,
        free_port,
        http_get,
        tree_cpu_s,
        tree_peak_rss_kib,
        wait_until_ready,
    )
    from wrk import run_wrk

    bodies = args.bodies.split(",")
    errors = 0
    lines = [
        "| body | client  | req/s  | CPU µs/req | peak RSS MiB | x aiohttp | errors |",
        "|------|---------|--------|------------|--------------|-----------|--------|",
    ]
    with tempfile.TemporaryDirectory(prefix="tokengate-http1cmp-") as tmp:
        procs = Processes(Path(tmp))
        try:
            origin_port = free_port()
            origin = procs.start("origin", nginx.origin_argv(Path(tmp) / "origin", origin_port))
            wait_until_ready(origin, f"http://{LOOPBACK}:{origin_port}/200b")
            for body in bodies:
                ports, proxies = {}, {}
                for client in CLIENTS:  # fresh processes per body: peak RSS is that body's
                    ports[client] = free_port()
                    argv = [sys.executable, __file__, "serve", "--client", client]
                    argv += ["--port", str(ports[client]), "--upstream-port", str(origin_port)]
                    proxies[client] = procs.start(f"proxy-{client}-{body}", argv)
                    url = f"http://{LOOPBACK}:{ports[client]}/{body}"
                    wait_until_ready(proxies[client], url)
                    status, payload = http_get(url)
                    if status != 200 or len(payload) != nginx.BODIES[body]:
                        raise BenchError(f"{client}: probe got {status}, {len(payload)} bytes")
                    run_wrk(url, duration_s=1, threads=args.threads, connections=64)  # warm-up
                rps: dict[str, list[float]] = {c: [] for c in CLIENTS}
                cpu: dict[str, list[float]] = {c: [] for c in CLIENTS}
                failed = {c: 0 for c in CLIENTS}
                ratios = []
                for round_no in range(args.rounds):
                    for client in CLIENTS:
                        url = f"http://{LOOPBACK}:{ports[client]}/{body}"
                        cpu_before = tree_cpu_s(proxies[client].pid)
                        result = run_wrk(
                            url,
                            duration_s=args.duration,
                            threads=args.threads,
                            connections=args.connections,
                        )
                        used_s = tree_cpu_s(proxies[client].pid) - cpu_before
                        rps[client].append(result.rps)
                        cpu[client].append(used_s / max(result.requests, 1) * 1e6)
                        failed[client] += result.errors
                        log(f"{body} round {round_no + 1} {client}: {result.rps:,.0f} req/s")
                    ratios.append(rps["http1"][-1] / rps["aiohttp"][-1])
                for client in CLIENTS:
                    ratio = statistics.median(ratios) if client == "http1" else 1.0
                    peak_mib = tree_peak_rss_kib(proxies[client].pid) / 1024
                    lines.append(
                        f"| {body:<4} | {client:<7} | {statistics.median(rps[client]):>6,.0f} "
                        f"| {statistics.median(cpu[client]):>10,.0f} | {peak_mib:>12.1f} "
                        f"| {ratio:>9.2f} | {failed[client]:>6} |"
                    )
                errors += sum(failed.values())
                for client in CLIENTS:
                    procs.stop(proxies[client])
        except BenchError as exc:
            log(f"bench: {exc}")
            return 1
        finally:
            procs.stop_all()
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rounds} "
        "interleaved rounds, medians; x aiohttp = median of per-round ratios\n"
    )
    print("\n".join(lines), flush=True)
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    proxy = sub.add_parser("serve", help="run one proxy (the driver starts these)")
    proxy.add_argument("--client", choices=CLIENTS, required=True)
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--bodies", default="200b,16k,1m")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.client, args.port, args.upstream_port)
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    status = measure(args)
    log(f"done in {time.monotonic() - started:.0f}s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

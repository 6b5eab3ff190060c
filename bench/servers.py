"""Starting what a target needs: the origin, the issuer and tokens, Redis and sessions,
the OTLP trace sink, and each proxy.

:class:`Lab` owns the run's temp dir and every process in it (through ``Processes``).
The origin, the issuer, Redis and the trace sink live for the whole benchmark; proxies are
started per group of runs (:meth:`Lab.start`) so each group's peak RSS is its own.
:meth:`Lab.client_args` says what wrk sends to a target: nothing, one token (a JWT or an
opaque one), a new token every request, a DPoP-bound token with a new proof every request
(signed for that run just before it), or a new session cookie every request.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import nginx
import redis
import yaml
from dpop import ProofSigner
from issuer import Issuer
from procs import (
    LOOPBACK,
    BenchError,
    Proc,
    Processes,
    free_port,
    http_get,
    listening_sockets,
    tree_cpu_s,
    wait_for_redis,
    wait_until_ready,
)
from seed import Footprint, new_session, seed, seed_and_measure
from targets import CSRF_HEADER, SESSION_COOKIE, Target, session_settings, tokengate_config

from gateway.settings import SessionSettings

BENCH_DIR = Path(__file__).resolve().parent
PICK_HEADER_LUA = BENCH_DIR / "lua" / "pick_header.lua"
TOKEN_CACHE_SIZE = 1024  # tokengate's default oidc.token_cache_size, set explicitly
REDIS_SERVER = "/usr/bin/redis-server"
# DPoP proofs signed before each run of a dpop client: this many per second of the run, so
# that none is sent twice (tokengate refuses a replay); far above what it serves here.
DPOP_PROOFS_PER_S = 12_000


@dataclass
class Running:
    """A started target: where to send requests, and whose process tree to measure."""

    target: Target
    base_url: str
    proc: Proc | None  # None: the shared origin, not measured
    admin_port: int | None = None

    def url(self, body: str) -> str:
        return f"{self.base_url}{self.target.path}/{body}"


class Lab:
    def __init__(self, tmp: Path, procs: Processes, *, access_log: bool) -> None:
        self.tmp = tmp
        self.procs = procs
        self.access_log = access_log
        self.origin_port = 0
        self.origin_pid = 0
        self.issuer: Issuer | None = None
        self.issuer_url: str | None = None
        self.warm_token = ""
        self.opaque_token = ""  # introspect-warm: introspected at the issuer
        self.dpop_signer = ProofSigner()
        self.dpop_token = ""  # bound to dpop_signer's key (cnf.jkt)
        self.dpop_proofs: dict[str, int] = {}  # proofs in each target's file, its last run
        self.cold_tokens_file = tmp / "tokens.txt"
        self.cold_first = ""
        self.redis_url: str | None = None
        self.otlp_url: str | None = None  # the trace sink (otlp_sink.py)
        self.otlp_proc: Proc | None = None
        self._otlp_cpu_at_start = 0.0
        self.cookies_file = tmp / "cookies.txt"
        self.first_cookie = ""
        # Next line of each client's file, carried across runs (bearer-cold: tokens stay new).
        self._cursors: dict[str, int] = {}

    # -- shared fixtures -------------------------------------------------------------

    def start_origin(self) -> None:
        self.origin_port = free_port()
        proc = self.procs.start("origin", nginx.origin_argv(self.tmp / "origin", self.origin_port))
        self.origin_pid = proc.pid
        wait_until_ready(proc, f"http://{LOOPBACK}:{self.origin_port}/200b")

    def start_issuer(self, cold_tokens: int, token_latency_ms: float) -> None:
        port = free_port()
        self.issuer_url = f"http://{LOOPBACK}:{port}"
        issuer = self.issuer = Issuer.generate(self.issuer_url)
        key = self.tmp / "issuer.pem"
        issuer.write_pem(key)
        argv = [
            sys.executable,
            str(BENCH_DIR / "issuer.py"),
            "--key",
            str(key),
            "--port",
            str(port),
            "--token-latency-ms",
            str(token_latency_ms),
        ]
        proc = self.procs.start("issuer", argv)
        self.warm_token = issuer.mint("warm-user")
        self.opaque_token = issuer.mint_opaque()
        self.dpop_token = issuer.mint("dpop-user", cnf={"jkt": self.dpop_signer.thumbprint})
        if cold_tokens > 0:
            started = time.monotonic()
            tokens = [issuer.mint(f"user-{i}") for i in range(cold_tokens)]
            self.cold_tokens_file.write_text("\n".join(tokens) + "\n")
            self.cold_first = tokens[0]
            _log(f"minted {cold_tokens} tokens in {time.monotonic() - started:.1f}s")
        wait_until_ready(proc, f"{self.issuer_url}/.well-known/openid-configuration")

    def start_redis(self) -> None:
        """A redis-server on a free loopback port, no persistence, for the session store."""
        port = free_port()
        argv = [
            REDIS_SERVER,
            *("--port", str(port), "--bind", LOOPBACK),
            *("--save", "", "--appendonly", "no", "--dir", str(self.tmp)),
            *("--loglevel", "warning"),
        ]
        proc = self.procs.start("redis", argv)
        wait_for_redis(proc, port)
        self.redis_url = f"redis://{LOOPBACK}:{port}/0"

    def start_otlp_sink(self) -> None:
        """The OTLP/HTTP sink that ``tracing: sdk`` targets export their spans to."""
        port = free_port()
        self.otlp_url = f"http://{LOOPBACK}:{port}"
        argv = [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--port", str(port)]
        proc = self.otlp_proc = self.procs.start("otlp-sink", argv)
        wait_until_ready(proc, f"{self.otlp_url}/__stats")
        self._otlp_cpu_at_start = tree_cpu_s(proc.pid)

    def otlp_cpu_s(self) -> float:
        """CPU the sink has used since it was ready (its imports left out): receiving and
        counting spans, on the same cores, counted in no target's CPU µs/req."""
        assert self.otlp_proc is not None
        return tree_cpu_s(self.otlp_proc.pid) - self._otlp_cpu_at_start

    def otlp_stats(self) -> dict[str, int]:
        """What the sink has received: export requests, spans, bytes, malformed requests."""
        assert self.otlp_url is not None
        status, body = http_get(f"{self.otlp_url}/__stats")
        if status != 200:
            raise BenchError(f"OTLP sink /__stats answered {status}")
        stats: dict[str, int] = json.loads(body)
        return stats

    @property
    def session_settings(self) -> SessionSettings:
        """The ``session:`` section tokengate runs with, for writing its sessions."""
        assert self.redis_url is not None
        return SessionSettings(**session_settings(self.redis_url))

    def seed_sessions(self, count: int) -> Footprint:
        """``count`` sessions with valid ten-year access tokens (no refresh during the run),
        one cookie value per line in cookies.txt for wrk."""
        assert self.issuer is not None
        started = time.monotonic()
        sessions = []
        for i in range(count):
            subject = f"session-user-{i}"
            token = self.issuer.mint(subject)
            sessions.append(new_session(subject, token, _expiry(token), f"rt-bench-{i}"))
        seeded, footprint = seed_and_measure(self.session_settings, sessions)
        self.cookies_file.write_text("".join(s.cookie + "\n" for s in seeded))
        self.first_cookie = seeded[0].cookie
        _log(f"seeded {count} sessions in Redis in {time.monotonic() - started:.1f}s")
        return footprint

    def seed_session(self, subject: str, *, expired: bool) -> str:
        """One new session, its access token valid or expired a minute ago; its cookie."""
        assert self.issuer is not None
        lifetime_s = -60 if expired else 3600
        token = self.issuer.mint(subject, lifetime_s)
        refresh_token = f"rt-seed-{secrets.token_urlsafe(24)}"  # new to the issuer
        session = new_session(subject, token, _expiry(token), refresh_token)
        return seed(self.session_settings, [session])[0].cookie

    def introspections(self) -> dict[str, int]:
        """The issuer's introspection calls so far: active, inactive, unauthenticated."""
        assert self.issuer_url is not None
        status, body = http_get(f"{self.issuer_url}/__stats")
        if status != 200:
            raise BenchError(f"issuer /__stats answered {status}")
        calls: dict[str, int] = json.loads(body)["introspections"]
        return calls

    def redis_version(self) -> str:
        assert self.redis_url is not None
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
            return f"Redis {info['redis_version']}"
        finally:
            client.close()

    @staticmethod
    def session_headers(cookie: str) -> dict[str, str]:
        """What a browser's script sends: the cookie and the CSRF header, no Origin."""
        return {"Cookie": f"{SESSION_COOKIE}={cookie}", CSRF_HEADER: "1"}

    # -- targets ---------------------------------------------------------------------

    def start(self, targets: list[Target], tag: str) -> dict[str, Running]:
        """Start ``targets`` at once, then wait until each is ready and answers 200."""
        pending = [(t, self._launch(t, tag)) for t in targets]
        running = {}
        for target, (run, ready_url) in pending:
            if run.proc is not None:
                self._wait_ready(run, ready_url)
            running[target.name] = run
        return running

    def _launch(self, target: Target, tag: str) -> tuple[Running, str]:
        if target.kind == "origin":
            url = f"http://{LOOPBACK}:{self.origin_port}"
            return Running(target, url, None), f"{url}/200b"
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        name = f"{target.name}-{tag}"
        if target.kind == "nginx":
            argv = nginx.proxy_argv(self.tmp / name, port, self.origin_port)
            return Running(target, url, self.procs.start(name, argv)), f"{url}/200b"
        if target.kind == "floor":
            argv = [
                sys.executable,
                str(BENCH_DIR / "floor.py"),
                "--port",
                str(port),
                "--upstream",
                f"http://{LOOPBACK}:{self.origin_port}",
                "--client",
                target.floor_client,
            ]
            return Running(target, url, self.procs.start(name, argv)), f"{url}/200b"
        admin_port = free_port()
        config = tokengate_config(
            port=port,
            admin_port=admin_port,
            origin_url=f"http://{LOOPBACK}:{self.origin_port}",
            issuer_url=self.issuer_url if "issuer" in target.needs else None,
            redis_url=self.redis_url if "redis" in target.needs else None,
            workers=target.workers,
            access_log=self.access_log,
            token_cache_size=TOKEN_CACHE_SIZE,
            tracing=target.tracing,
            otlp_url=self.otlp_url if "otlp" in target.needs else None,
        )
        config_path = self.tmp / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # The bench's config is the whole truth: no TOKENGATE_* from the caller's shell, and
        # no OTEL_* (the SDK reads them: service name, headers, compression, endpoints).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}
        argv = [sys.executable, "-m", "gateway", "run", "--config", str(config_path)]
        proc = self.procs.start(name, argv, env=env)
        return Running(target, url, proc, admin_port), f"http://{LOOPBACK}:{admin_port}/readyz"

    def _wait_ready(self, run: Running, ready_url: str) -> None:
        assert run.proc is not None
        wait_until_ready(run.proc, ready_url)
        workers = run.target.workers
        if workers == 1:
            return
        # SO_REUSEPORT: every worker must listen (and be ready) before traffic starts.
        port = int(run.base_url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        streak = 0
        while streak < 20 * workers:
            if time.monotonic() > deadline:
                raise BenchError(f"{run.target.name}: workers not all ready\n{run.proc.log_tail()}")
            both_listen = (
                listening_sockets(port) >= workers
                and listening_sockets(run.admin_port or 0) >= workers
            )
            ok = both_listen and http_get(ready_url, timeout_s=1.0)[0] == 200
            streak = streak + 1 if ok else 0
            if not ok:
                time.sleep(0.05)  # polling interval

    def probe(self, run: Running, body: str) -> None:
        """One request as wrk will send it: must be a 200 with the whole body."""
        headers = {}
        if run.target.client == "bearer-warm":
            headers["Authorization"] = f"Bearer {self.warm_token}"
        elif run.target.client == "bearer-cold":
            headers["Authorization"] = f"Bearer {self.cold_first}"
        elif run.target.client == "introspect-warm":
            headers["Authorization"] = f"Bearer {self.opaque_token}"
        elif run.target.client == "dpop":
            headers["Authorization"] = f"DPoP {self.dpop_token}"
            headers["DPoP"] = self.dpop_signer.proof(
                method="GET", url=run.url(body), access_token=self.dpop_token
            )
        elif run.target.client in ("session", "refresh-storm"):
            headers = self.session_headers(self.first_cookie)
        status, data = http_get(run.url(body), headers)
        if status != 200 or len(data) != nginx.BODIES[body]:
            tail = run.proc.log_tail() if run.proc else ""
            raise BenchError(
                f"{run.target.name}: GET {run.url(body)} answered {status} "
                f"with {len(data)} bytes\n{tail}"
            )

    def client_args(
        self, target: Target, threads: int, url: str, duration_s: float
    ) -> tuple[list[str], list[str]]:
        """(wrk options, script arguments) for what this target's client sends to ``url``
        in a run of ``duration_s``. For a dpop client this signs the run's proofs."""
        if target.client == "plain":
            return [], []
        if target.client == "bearer-warm":
            return ["-H", f"Authorization: Bearer {self.warm_token}"], []
        if target.client == "introspect-warm":
            return ["-H", f"Authorization: Bearer {self.opaque_token}"], []
        if target.client == "dpop":
            proofs = self.write_dpop_proofs(target, url, duration_s)
            return ["-s", str(PICK_HEADER_LUA), "-H", f"Authorization: DPoP {self.dpop_token}"], [
                str(proofs),
                "DPoP",
                "",  # the proof is the whole header value
                "0",  # a new file each run: from its first line
                str(threads),
            ]
        start = str(self._cursors.get(target.client, 0))
        if target.client == "bearer-cold":
            return ["-s", str(PICK_HEADER_LUA)], [
                str(self.cold_tokens_file),
                "Authorization",
                "Bearer ",
                start,
                str(threads),
            ]
        if target.client == "session":
            return ["-s", str(PICK_HEADER_LUA), "-H", f"{CSRF_HEADER}: 1"], [
                str(self.cookies_file),
                "Cookie",
                f"{SESSION_COOKIE}=",
                start,
                str(threads),
            ]
        raise BenchError(f"{target.name}: client {target.client!r} is not a wrk client")

    def write_dpop_proofs(self, target: Target, url: str, duration_s: float) -> Path:
        """A new file of ``DPOP_PROOFS_PER_S`` x ``duration_s`` proofs for GET ``url``, each
        to be sent once (see :meth:`check_dpop_run`)."""
        count = round(DPOP_PROOFS_PER_S * max(1.0, duration_s))
        path = self.tmp / f"proofs-{target.name}.txt"
        elapsed = self.dpop_signer.write_proofs(
            path, count, method="GET", url=url.partition("?")[0], access_token=self.dpop_token
        )
        self.dpop_proofs[target.name] = count
        _log(
            f"{target.name}: signed {count:,} DPoP proofs in {elapsed:.2f}s "
            f"({elapsed * 1e6 / count:.0f} µs each)"
        )
        return path

    def check_dpop_run(
        self, target: Target, threads: int, requests: int, next_index: int | None
    ) -> None:
        """Refuse a run that sent a proof twice: more requests than proofs, or a wrk thread
        that went past the end of the file (pick_header.lua would start over). Thread t
        sends lines t, t + threads, ...: the last line sent is at most the highest next
        index less ``threads``."""
        proofs = self.dpop_proofs.get(target.name, 0)
        if next_index is None or requests > proofs or next_index - threads >= proofs:
            raise BenchError(
                f"{target.name}: {requests:,} requests (next index {next_index}) but "
                f"{proofs:,} DPoP proofs: a proof would repeat; raise DPOP_PROOFS_PER_S"
            )

    def advance_cursor(self, target: Target, next_index: int) -> None:
        """Continue the next run where this one stopped (bearer-cold: tokens new to tokengate)."""
        self._cursors[target.client] = next_index


def _expiry(token: str) -> float:
    """The ``exp`` of a token we just minted, as the session's access-token expiry."""
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

"""The demo stack: the test OpenID Provider, Redis, a sample API, the SPA's static files and
tokengate in front of them, each a child process on a loopback port.

    stack = DemoStack(DemoPorts.from_env()).start()
    ... stack.url, stack.metrics_url ...
    stack.stop()

Start order is Redis, IdP, API, SPA, tokengate; each is awaited on a condition (a PING,
its ``READY <port>`` line, ``/readyz``) before the next starts. ``stop()`` stops every child
by its pid in reverse order (SIGTERM, then SIGKILL after a grace period). ``demo/run.py``
is the command around this; ``tests/e2e`` start one on free ports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp

from tests.support.idp import (
    CLIENT_SECRET,
    DEFAULT_RESOURCE,
    IDP_DIR,
    SERVER_JS,
    complete_login,
    default_idp_config,
)

DEMO_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEMO_DIR.parent
HOST = "127.0.0.1"  # every child listens on loopback only
PUBLIC_HOST = "localhost"  # the browser's name for tokengate; a site apart from the IdP's
SCOPES = ("openid", "profile", "email", "offline_access", "api.read")
COOKIE_NAME = "tokengate"
_POLL_S = 0.05  # between readiness probes, always bounded by a deadline
_STOP_GRACE_S = 10.0

# The IdP would let these override the configuration we hand it.
_IGNORED_ENV = frozenset({"IDP_CONFIG_FILE", "IDP_PORT", "IDP_HOST"})

StoreChoice = Literal["auto", "redis", "memory"]

# Environment variable of each port, read by DemoPorts.from_env().
PORT_ENV = {
    "gateway": "DEMO_GATEWAY_PORT",
    "admin": "DEMO_ADMIN_PORT",
    "idp": "DEMO_IDP_PORT",
    "api": "DEMO_API_PORT",
    "spa": "DEMO_SPA_PORT",
    "redis": "DEMO_REDIS_PORT",
}


class DemoError(RuntimeError):
    """A part of the stack did not start; the message says which and shows its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something listens on ``port``. SO_REUSEADDR, as the servers themselves set
    it: connections of a previous run in TIME_WAIT do not make a port busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def find_redis_server() -> str | None:
    if Path("/usr/bin/redis-server").exists():
        return "/usr/bin/redis-server"
    return shutil.which("redis-server")


@dataclass(frozen=True, slots=True)
class DemoPorts:
    gateway: int = 8080  # tokengate, the only URL a browser needs
    admin: int = 9090  # tokengate's /metrics /healthz /readyz
    idp: int = 9000
    api: int = 9001
    spa: int = 9002
    redis: int = 6390  # not 6379: leave a developer's own Redis alone

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DemoPorts:
        values: dict[str, int] = {}
        for name, variable in PORT_ENV.items():
            raw = environ.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise DemoError(f"{variable} must be a port number, not {raw!r}") from None
            if not 0 < values[name] < 65536:
                raise DemoError(f"{variable} must be 1..65535")
        return cls(**values)

    @classmethod
    def free(cls) -> DemoPorts:
        """Free ports for everything (tests)."""
        return cls(**{f.name: free_port() for f in fields(cls)})

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


class _Child:
    """One child process, its log file, and how to tell it is ready."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_line: bool, process_group: int | None) -> None:
        with self.log_path.open("wb") as log:  # each run starts a fresh log
            self.proc = subprocess.Popen(  # noqa: S603 - our own fixed argv
                self.argv,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                # Children that announce themselves print `READY <port>` and nothing else
                # on stdout; their logs go to stderr, i.e. the log file.
                stdout=subprocess.PIPE if ready_line else log,
                stderr=log,
                env=self.env,
                process_group=process_group,
            )

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DemoError(f"{self.name} is not started")
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").rstrip().splitlines()
        return "\n".join(text[-lines:])

    def failure(self, what: str) -> DemoError:
        return DemoError(f"{self.name} {what} (log: {self.log_path})\n{self.log_tail()}")

    def wait_ready_line(self, deadline: float) -> None:
        """Block on the child's stdout until it prints ``READY <port>``."""
        if self.proc is None or self.proc.stdout is None:
            raise DemoError(f"{self.name} is not started with a READY line")
        fd = self.proc.stdout.fileno()
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self.failure("did not print READY in time")
                if not selector.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait()
                    raise self.failure(f"exited with {self.proc.returncode} before READY")
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.startswith(b"READY "):
                        return

    def wait_until(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        """Probe ``condition`` until it holds, the child exits, or the deadline passes."""
        while not condition():
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise self.failure(f"exited with {code} before {what}")
            if time.monotonic() > deadline:
                raise self.failure(f"not {what} in time")
            time.sleep(_POLL_S)

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def redis_answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - a loopback http URL
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class DemoStack:
    """Everything the demo runs, on ``ports``; ``start()`` then ``stop()`` (or ``with``).

    ``access_token_ttl_s`` is the IdP's access-token lifetime (short, so refreshes happen
    while you watch); ``refresh_ahead_s`` is tokengate's ``refresh.ahead_s``. ``store``
    ``auto`` uses redis-server when installed and the memory store otherwise. Logs, and
    the generated tokengate configuration, go to ``log_dir`` (a temporary directory,
    removed by ``stop()``, when not given).
    """

    def __init__(
        self,
        ports: DemoPorts | None = None,
        *,
        access_token_ttl_s: int = 30,
        refresh_ahead_s: float = 5.0,
        store: StoreChoice = "auto",
        log_dir: Path | None = None,
        own_process_group: bool = False,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.ports = ports or DemoPorts()
        self.access_token_ttl_s = access_token_ttl_s
        self.refresh_ahead_s = refresh_ahead_s
        self._redis_binary = find_redis_server()
        if store == "redis" and self._redis_binary is None:
            raise DemoError("redis-server is not installed (apt-get install redis-server)")
        self.store: Literal["redis", "memory"] = (
            "memory" if store == "memory" or self._redis_binary is None else "redis"
        )
        self._given_log_dir = log_dir
        self._tmp_dir: tempfile.TemporaryDirectory[str] | None = None
        self.log_dir: Path | None = None
        self._own_process_group = own_process_group
        self._start_timeout_s = start_timeout_s
        self._children: list[_Child] = []

    # -- addresses ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """tokengate's public URL: the SPA, /api and /auth/, as a browser opens them."""
        return f"http://{PUBLIC_HOST}:{self.ports.gateway}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.ports.admin}"

    @property
    def metrics_url(self) -> str:
        return f"{self.admin_url}/metrics"

    @property
    def idp_url(self) -> str:
        """The IdP's issuer. 127.0.0.1, not localhost: cookies ignore ports, and the IdP's
        must not reach tokengate (nor tokengate's the IdP)."""
        return f"http://{HOST}:{self.ports.idp}"

    @property
    def api_url(self) -> str:
        """The sample API directly, bypassing tokengate (its /__demo/stats lives here)."""
        return f"http://{HOST}:{self.ports.api}"

    @property
    def spa_url(self) -> str:
        return f"http://{HOST}:{self.ports.spa}"

    @property
    def redis_url(self) -> str | None:
        return f"redis://{HOST}:{self.ports.redis}/0" if self.store == "redis" else None

    @property
    def config_path(self) -> Path:
        if self.log_dir is None:
            raise DemoError("the stack is not started")
        return self.log_dir / "tokengate.yaml"

    # -- configuration ------------------------------------------------------------------

    def idp_config(self) -> dict[str, Any]:
        config = default_idp_config(
            redirect_uri=f"{self.url}/auth/callback",
            post_logout_redirect_uri=f"{self.url}/",
            backchannel_logout_uri=f"{self.url}/auth/backchannel-logout",
            access_token_ttl=self.access_token_ttl_s,
        )
        return {**config, "host": HOST, "port": self.ports.idp}

    def gateway_config(self) -> dict[str, Any]:
        session: dict[str, Any] = {
            "store": self.store,
            "cookie_name": COOKIE_NAME,
            "cookie_secure": False,  # allowed for an http loopback public_url only
        }
        if self.redis_url is not None:
            session["redis_url"] = self.redis_url
        return {
            "listen": {"host": HOST, "port": self.ports.gateway},
            "admin": {"host": HOST, "port": self.ports.admin},
            "public_url": self.url,
            "oidc": {
                "issuer": self.idp_url,
                "client_id": "tokengate",
                "client_secret": CLIENT_SECRET,
                "audience": DEFAULT_RESOURCE,
                "scopes": list(SCOPES),
            },
            "refresh": {"ahead_s": self.refresh_ahead_s, "timeout_s": 5},
            "session": session,
            "limits": {"shutdown_delay_s": 0, "shutdown_grace_s": 5},
            "log": {"format": "text"},
            "routes": [
                {
                    "prefix": "/api",
                    "name": "api",
                    "upstream": self.api_url,
                    "auth": "session_or_bearer",
                    "scopes": ["api.read"],
                },
                {"prefix": "/", "name": "spa", "upstream": self.spa_url, "auth": "none"},
            ],
        }

    # -- a bearer token for curl -----------------------------------------------------------

    async def fetch_access_token(self, username: str = "alice") -> str:
        """An access token for the API from the running demo IdP, for ``curl -H
        "Authorization: Bearer ..."``: the authorization code flow with PKCE done over plain
        HTTP as client ``tokengate`` (its redirect is read, never followed)."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        redirect_uri = f"{self.url}/auth/callback"
        query = {
            "client_id": "tokengate",
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": "openid api.read",
            "state": secrets.token_urlsafe(16),
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        jar = aiohttp.CookieJar(unsafe=True)  # the IdP lives on an IP address
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
            async with http.get(f"{self.idp_url}/.well-known/openid-configuration") as resp:
                metadata = await resp.json()
            start = f"{metadata['authorization_endpoint']}?{urlencode(query)}"
            callback = await complete_login(http, start, username, "demo", idp_origin=self.idp_url)
            code = parse_qs(urlsplit(callback).query).get("code")
            if not code:
                raise DemoError(f"the IdP did not issue a code: {callback}")
            form = {
                "grant_type": "authorization_code",
                "code": code[0],
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
            basic = base64.b64encode(f"tokengate:{CLIENT_SECRET}".encode()).decode()
            headers = {"Authorization": f"Basic {basic}"}  # client_secret_basic
            async with http.post(metadata["token_endpoint"], data=form, headers=headers) as resp:
                tokens = await resp.json()
            if resp.status != 200 or "access_token" not in tokens:
                raise DemoError(f"the token endpoint answered {resp.status}: {tokens}")
            token: str = tokens["access_token"]
            return token

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> DemoStack:
        if self._children:
            raise DemoError("already started")
        node = shutil.which("node")
        if node is None:
            raise DemoError("node is not on PATH (the demo IdP needs Node.js >= 20.18)")
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise DemoError("tests/idp/node_modules is missing: run `make idp-deps`")
        busy = [
            f"{name} port {port} ({PORT_ENV[name]})"
            for name, port in self.ports.items()
            if (name != "redis" or self.store == "redis") and port_in_use(port)
        ]
        if busy:
            raise DemoError("already in use: " + ", ".join(busy) + "; pick other ports")
        self.log_dir = self._make_log_dir()
        try:
            self._start_all(node)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_log_dir(self) -> Path:
        if self._given_log_dir is not None:
            self._given_log_dir.mkdir(parents=True, exist_ok=True)
            return self._given_log_dir
        self._tmp_dir = tempfile.TemporaryDirectory(prefix="tokengate-demo-")
        return Path(self._tmp_dir.name)

    def _spawn(self, name: str, argv: list[str], *, ready_line: bool, **env: str) -> _Child:
        assert self.log_dir is not None
        child_env = {k: v for k, v in os.environ.items() if k not in _IGNORED_ENV} | env
        child = _Child(name, argv, self.log_dir / f"{name}.log", env=child_env)
        group: int | None = None
        if self._own_process_group:
            # One group of our own: a Ctrl-C at the terminal reaches only the parent, which
            # stops the children in order; `kill -- -<pgid>` still ends them all at once.
            group = self._children[0].pid if self._children else 0
        child.start(ready_line=ready_line, process_group=group)
        self._children.append(child)
        return child

    def _start_all(self, node: str) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        python = sys.executable
        if self.store == "redis":
            assert self._redis_binary is not None
            redis = self._spawn(
                "redis",
                [
                    self._redis_binary,
                    *("--port", str(self.ports.redis), "--bind", HOST),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.log_dir)),
                ],
                ready_line=False,
            )
            redis.wait_until(lambda: redis_answers_ping(self.ports.redis), deadline, "answering")
        idp_env = {"IDP_CONFIG": json.dumps(self.idp_config())}
        idp = self._spawn("idp", [node, str(SERVER_JS)], ready_line=True, **idp_env)
        idp.wait_ready_line(deadline)
        for name, script, port in (
            ("api", "api.py", self.ports.api),
            ("spa", "spa_server.py", self.ports.spa),
        ):
            argv = [python, str(DEMO_DIR / script), "--host", HOST, "--port", str(port)]
            self._spawn(name, argv, ready_line=True).wait_ready_line(deadline)
        self.config_path.write_text(json.dumps(self.gateway_config(), indent=2))  # JSON is YAML
        gateway = self._spawn(
            "tokengate",
            [python, "-m", "gateway", "run", "--config", str(self.config_path)],
            ready_line=False,
        )
        gateway.wait_until(lambda: http_ok(f"{self.admin_url}/readyz"), deadline, "ready")

    def exited(self) -> list[str]:
        """Names of children that have exited."""
        return [child.name for child in self._children if child.exited()]

    def wait(self) -> str:
        """Block until a child exits (without reaping it first); return its name."""
        ours = {child.pid: child for child in self._children if child.proc is not None}
        while True:
            for child in ours.values():
                if child.exited():
                    return child.name
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            if info is not None and info.si_pid not in ours:
                os.waitpid(info.si_pid, 0)  # not one of ours (none expected): reap and go on

    def log_path(self, name: str) -> Path:
        for child in self._children:
            if child.name == name:
                return child.log_path
        raise KeyError(name)

    def stop(self) -> None:
        """Stop every child by its pid, newest first; then remove a temporary log dir."""
        while self._children:
            child = self._children.pop()
            try:
                child.stop()
            except Exception as exc:  # noqa: BLE001 - go on stopping the others
                print(f"demo: stopping {child.name} failed: {exc!r}", file=sys.stderr)
        if self._tmp_dir is not None:
            self._tmp_dir.cleanup()
            self._tmp_dir = None

    def __enter__(self) -> DemoStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

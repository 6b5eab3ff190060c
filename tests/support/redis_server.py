"""A throw-away ``redis-server`` on a free loopback port, for tests and fault injection.

    server = RedisServerProcess().start()
    ... server.url ...
    server.kill(); server.restart()   # Redis gone mid-test, then back on the same port
    server.stop()

Synchronous (subprocess and plain sockets), so session-scoped fixtures can use it. No
persistence: every start is an empty server.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServerError(RuntimeError):
    """redis-server did not start, or did not answer PING in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_available() -> bool:
    return Path(REDIS_SERVER).exists() or shutil.which("redis-server") is not None


class RedisServerProcess:
    def __init__(
        self,
        *,
        start_timeout_s: float = 10.0,
        args: tuple[str, ...] = (),
        config: str | None = None,
    ) -> None:
        """``args`` are more redis-server options (``--replicaof``, ``--cluster-enabled``);
        ``config`` is the text of a configuration file given first (a Sentinel's, which
        redis-server rewrites as it learns the topology)."""
        self._start_timeout_s = start_timeout_s
        self._args = args
        self._config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServerProcess:
        if self._proc is not None:
            raise RedisServerError("already started")
        if self._port is None:
            self._port = free_port()  # kept across restart(), so clients reconnect
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="tokengate-redis-")
        binary = REDIS_SERVER if Path(REDIS_SERVER).exists() else shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed")
        first: list[str] = []
        if self._config is not None:
            config_path = Path(self._workdir.name) / "redis.conf"
            if not config_path.exists():  # kept across restart(): Sentinel rewrites it
                config_path.write_text(self._config)
            first = [str(config_path)]
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    *first,
                    *("--port", str(self._port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", self._workdir.name),
                    *self._args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_for_ping()
        except BaseException:
            self._terminate()
            raise
        return self

    @property
    def _log_path(self) -> Path:
        if self._workdir is None:
            raise RedisServerError("not started")
        return Path(self._workdir.name) / "redis.log"

    def log(self) -> str:
        """What redis-server wrote so far (for failure messages)."""
        path = self._log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_for_ping(self) -> None:
        proc = self._proc
        if proc is None:
            raise RedisServerError("not started")
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self._ping():
                return
            try:
                code = proc.wait(timeout=0.01)  # the pause between attempts; catches an exit
            except subprocess.TimeoutExpired:
                continue
            raise RedisServerError(f"redis-server exited with {code}\n{self.log()}")
        raise RedisServerError(f"no PONG within {self._start_timeout_s}s\n{self.log()}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _terminate(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: Redis disappears at once, as in a crash; `restart()` brings it back."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServerProcess:
        """An empty server again, on the same port."""
        self._terminate()
        return self.start()

    def stop(self) -> None:
        self._terminate()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Processes of the benchmark: start, wait until ready, measure from /proc, stop by pid.

Every process is started by :class:`Processes`, which stops it (SIGTERM, then SIGKILL
after a grace period) together with any descendant it left behind, whatever happens
to the driver (``try/finally`` in ``run.py``; the kernel's parent-death signal if
the driver itself is killed). Readiness is polled with a deadline, never slept for.
Linux only: CPU and memory come from ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
# Never let an environment proxy variable send a probe off the machine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """A process did not start, answer or behave as the benchmark needs."""


def free_port() -> int:
    """A loopback port nobody listens on (bind port 0, read what the kernel chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Owns every process the benchmark starts; ``stop_all`` ends them, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[Proc] = []

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Proc:
        log_path = self._log_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".log")
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # a terminal's Ctrl-C reaches the driver only
                preexec_fn=_die_with_parent,  # the driver has no threads
            )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 5.0) -> None:
        if proc in self._procs:
            self._procs.remove(proc)
        # (pid, start time): a pid the kernel reused meanwhile is never signalled.
        descendants = [(p, _start_time(p)) for p in tree_pids(proc.pid)[1:]]
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(grace_s)
        for pid, started in descendants:  # e.g. workers of a supervisor that was killed
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def serve_on_loopback(app: Any, port: int) -> None:
    """Serve an aiohttp ``app`` on 127.0.0.1:``port`` with uvloop until SIGTERM or SIGINT:
    how the floor, the issuer and the OTLP sink run (no access log, a short shutdown)."""
    import uvloop
    from aiohttp import web

    web.run_app(
        app,
        host=LOOPBACK,
        port=port,
        backlog=1024,
        shutdown_timeout=1.0,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


def wait_until_ready(proc: Proc, url: str, deadline_s: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the process has exited."""
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        status, _ = http_get(url, timeout_s=1.0)
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} not ready at {url} after {deadline_s}s:\n{proc.log_tail()}"
            )
        time.sleep(0.05)  # polling interval, not a wait for readiness


def wait_for_redis(proc: Proc, port: int, deadline_s: float = 10.0) -> None:
    """Poll a loopback redis-server with PING until it answers PONG."""
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection((LOOPBACK, port), timeout=1.0) as sock,
        ):
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} no PONG after {deadline_s}s:\n{proc.log_tail()}")
        time.sleep(0.05)  # polling interval


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 5.0
) -> tuple[int, bytes]:
    """(status, body) of a GET, or (0, b"") when nothing answered."""
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - http only
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (several with SO_REUSEPORT workers)."""
    wanted = f"{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[1].rsplit(":", 1)[1] == wanted and fields[3] == "0A":  # LISTEN
                    count += 1
    return count


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None  # stat field 22: starttime


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        queue.extend(children.get(pid, ()))
    return pids


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root``'s tree: live processes plus reaped children."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:
            # stat fields 14-17: utime stime cutime cstime (here shifted by 3)
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory line (VmHWM, VmRSS) in KiB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_peak_rss_kib(root: int) -> int:
    """Sum of VmHWM over the tree: the peak RSS of each process, added up."""
    return sum(status_kib(pid, "VmHWM") for pid in tree_pids(root))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""

"""tokengate as a real process (``python -m gateway run``), for multi-replica and signal tests.

Started with a generated YAML config; ready when its admin ``/readyz`` answers 200 (polled
with a deadline: the condition, not a fixed sleep). Stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class GatewayProcess:
    def __init__(self, config: dict[str, Any], *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self._env = env or {}
        self._dir = tempfile.TemporaryDirectory(prefix="tokengate-test-")
        self.config_path = Path(self._dir.name) / "tokengate.yaml"
        self.log_path = Path(self._dir.name) / "tokengate.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['listen']['port']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config['admin']['port']}"

    def start(self, timeout_s: float = 20.0) -> GatewayProcess:
        self.config_path.write_text(json.dumps(self.config))  # JSON is YAML
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self._env},
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tokengate exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)  # polling the readiness condition, bounded by the deadline
        self.stop()
        raise RuntimeError(f"tokengate not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._dir.cleanup()

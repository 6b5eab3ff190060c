"""Every shipped configuration and every documented Redis URL form passes ``check-config``
and then starts with ``run`` (admin ``/healthz`` answers), and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

CONFIG_DIR = Path(__file__).parents[2] / "config"
# The README's forms (session.redis_url); no server listens: building must not connect.
REDIS_URLS = (
    "redis://127.0.0.1:1/0",
    "rediss://user:pw@127.0.0.1:1/2",
    "unix:///nonexistent/redis.sock",
    "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/1",
    "rediss+sentinel://:pw@127.0.0.1:1/mymaster?sentinel_password=spw&ssl_ca_certs=/ca.pem",
    "redis+cluster://127.0.0.1:1",
    "redis+cluster://user:pw@127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
    "rediss+cluster://127.0.0.1:1,127.0.0.1:2/0",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    return {**env, **extra}


def check_then_run(config: Path, env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "gateway"]
    checked = subprocess.run(
        [*command, "check-config", "--config", str(config)],
        capture_output=True,
        check=False,
        env=env,
    )
    assert checked.returncode == 0, checked.stderr.decode()
    admin_port = free_port()
    env = {
        **env,
        "TOKENGATE_LISTEN__HOST": "127.0.0.1",
        "TOKENGATE_LISTEN__PORT": str(free_port()),
        "TOKENGATE_ADMIN__HOST": "127.0.0.1",
        "TOKENGATE_ADMIN__PORT": str(admin_port),
        "TOKENGATE_WORKERS": "1",
        "TOKENGATE_LIMITS__SHUTDOWN_DELAY_S": "0",
    }
    process = subprocess.Popen(
        [*command, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        alive = False
        while not alive and time.monotonic() < deadline and process.poll() is None:
            try:
                url = f"http://127.0.0.1:{admin_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    alive = resp.status == 200
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)  # polling the condition (the port open), bounded by deadline
        if not alive:
            process.kill()
            output = process.communicate(timeout=10)[0].decode(errors="replace")
            pytest.fail(f"run did not start:\n{output}")
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode(errors="replace")
        assert process.returncode == 0, output
        assert "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_checks_and_starts(path: Path) -> None:
    check_then_run(path, _env())


@pytest.mark.parametrize("url", REDIS_URLS)
def test_every_documented_redis_url_checks_and_starts(url: str) -> None:
    check_then_run(CONFIG_DIR / "tokengate.yaml", _env(TOKENGATE_SESSION__REDIS_URL=url))

"""Operations: graceful SIGTERM drain, metrics from every worker, a real Prometheus scrape,
promtool's verdict on our exposition, and logs that never carry a token or a cookie."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import ACCESS_LOG, STORE
from gateway.logs import ContextFilter, JsonFormatter
from gateway.metrics import FLUSH_EVERY_S
from gateway.sessions.cookie import parse_secret
from gateway.sessions.crypto import derive_handle
from tests.fakes.upstream import FakeUpstream
from tests.integration.conftest import Bff, free_port
from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration


@pytest.fixture
async def slow_upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = TestServer(fake.web_app(), host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    fake.release.set()
    await server.close()


def plain_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "limits": {"shutdown_delay_s": 0, "shutdown_grace_s": 10},
        "routes": [{"prefix": "/", "upstream": upstream_url, "auth": "none"}],
    }
    config.update(overrides)
    return config


async def test_sigterm_drains_in_flight_requests_and_exits_zero(
    slow_upstream: tuple[FakeUpstream, str],
) -> None:
    fake, url = slow_upstream
    gateway = GatewayProcess(plain_config(url)).start()
    try:
        async with aiohttp.ClientSession() as client:
            in_flight = asyncio.ensure_future(client.get(gateway.url + "/slow/report"))
            await fake.arrived.wait()
            gateway.signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                while True:  # not-ready comes first, while the request is still running
                    async with client.get(gateway.admin_url + "/readyz") as resp:
                        if resp.status == 503:
                            break
            fake.release.set()
            response = await in_flight
            assert response.status == 200
            assert (await response.json())["path"] == "/slow/report"
            response.release()
        assert await asyncio.to_thread(gateway.wait, 15) == 0
    finally:
        gateway.stop()


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> str:
    async with client.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def requests_total(exposition: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "tokengate_http_requests"
        for sample in family.samples
        if sample.name == "tokengate_http_requests_total"
    )


async def test_two_workers_export_every_request_through_one_scrape(
    slow_upstream: tuple[FakeUpstream, str],
) -> None:
    _, url = slow_upstream
    gateway = GatewayProcess(plain_config(url, workers=2)).start()
    try:
        async with asyncio.timeout(20):  # /readyz answered from one worker; await both
            while gateway.log().count('"event":"started"') < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        fresh_connections = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh_connections) as client:
            for i in range(60):  # new connections: the kernel spreads them over both workers
                async with client.get(f"{gateway.url}/item/{i}") as resp:
                    assert resp.status == 200
            # Each worker folds its counts into the shared files every FLUSH_EVERY_S (and
            # the one that answers a scrape, at once); then, whichever worker answers the
            # scrape, it reports both workers' counts.
            async with asyncio.timeout(FLUSH_EVERY_S * 5):
                while requests_total(await scrape(client, gateway.admin_url)) < 60:  # noqa: ASYNC110  # another process
                    await asyncio.sleep(FLUSH_EVERY_S / 10)
            totals = {requests_total(await scrape(client, gateway.admin_url)) for _ in range(6)}
        assert totals == {60.0}
    finally:
        gateway.stop()


async def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(
    slow_upstream: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    _, url = slow_upstream
    gateway = GatewayProcess(plain_config(url)).start()
    prometheus_port = free_port()
    admin = gateway.admin_url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tokengate\n    static_configs: [{{targets: ['{admin}']}}]\n"
    )
    prometheus = await asyncio.create_subprocess_exec(
        shutil.which("prometheus") or "/usr/bin/prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                async with client.get(gateway.url + "/x") as resp:
                    assert resp.status == 200
            exposition = await scrape(client, gateway.admin_url)
            promtool = await asyncio.create_subprocess_exec(
                "promtool",
                "check",
                "metrics",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            verdict, _ = await promtool.communicate(exposition.encode())
            assert promtool.returncode == 0, verdict.decode()
            query = f"http://127.0.0.1:{prometheus_port}/api/v1/query"
            async with asyncio.timeout(30):
                while True:  # polling Prometheus until its scrape of us has landed
                    try:
                        async with client.get(
                            query, params={"query": "tokengate_http_requests_total"}
                        ) as resp:
                            data = await resp.json()
                        if data["data"]["result"]:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
        series = data["data"]["result"][0]
        assert series["metric"]["route"] == "root"
        assert float(series["value"][1]) >= 5
    finally:
        prometheus.terminate()
        await prometheus.wait()
        gateway.stop()


async def test_a_whole_session_run_logs_no_token_and_no_cookie(
    bff: Bff, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:

    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(ContextFilter())
    caplog.handler.setFormatter(JsonFormatter())
    browser = bff.browser()
    await bff.login(browser)
    cookie = next(c.value for c in browser.cookie_jar if c.key == "tokengate")

    secret = parse_secret(cookie)
    assert secret is not None
    handle = derive_handle(secret)
    session = await bff.app[STORE].load(handle)
    assert session is not None

    await bff.app[STORE].save(
        handle, dataclasses.replace(session, access_expires_at=time.time() - 1)
    )
    assert (await bff.api(browser, "/api/items"))[0] == 200  # a refresh
    refreshed = await bff.app[STORE].load(handle)
    assert refreshed is not None
    async with aiohttp.ClientSession() as client:
        async with client.get(
            bff.url + "/api/x", headers={"Authorization": f"Bearer {refreshed.access_token}"}
        ) as resp:
            assert resp.status == 200
        async with client.get(
            bff.url + "/api/x", headers={"Authorization": "Bearer forged.eyJzdWIiOiJ4In0.sig"}
        ) as resp:
            assert resp.status == 401
    assert (await bff.api(browser, "/auth/logout", method="POST"))[0] == 200
    bff.app[ACCESS_LOG].flush()  # the batch it would write within 100 ms
    events = "\n".join(caplog.handler.format(record) for record in caplog.records)
    text = events + "\n" + capsys.readouterr().err  # event lines + access lines
    assert '"event":"access"' in text
    assert '"event":"refresh"' in text
    assert '"event":"login"' in text
    for name, value in {
        "old access token": session.access_token,
        "new access token": refreshed.access_token,
        "refresh token": session.refresh_token,
        "new refresh token": refreshed.refresh_token,
        "id token": session.id_token,
        "cookie": cookie,
    }.items():
        assert value
        assert value not in text, name
    assert "Bearer forged" not in text


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[2].joinpath("config").glob("*.yaml")), ids=str
)
def test_config_examples_pass_check_config(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")},
    )
    assert result.returncode == 0, result.stderr.decode()

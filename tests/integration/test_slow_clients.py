"""A thousand slow clients against one worker: tokengate runs as its own process (so that
file descriptors are split between it and this one), each stalled connection is closed
within its timeout, and clients that behave keep getting their 200s meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import statistics
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.raw_http import RawConn, RawServer, raw_servers
from tests.integration.conftest import free_port
from tests.support.gateway_process import GatewayProcess
from tests.support.stalling_clients import (
    OK,
    Hangups,
    get,
    open_non_reader,
    parse_response,
    read_until_closed,
)

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
# 1,000 connections on two shared cores: a close may come this much after its timeout
# (4 s late once, in the full suite on a loaded CI-sized machine; minutes before the fix).
MARGIN_S = 6.0
NON_READERS = 150  # each makes the kernel queue megabytes on loopback: fewer of them
HEAD_TRICKLERS = 425
BODY_TRICKLERS = 425
TRICKLE_EVERY_S = 0.25
OPEN_FILES_NEEDED = 3 * (NON_READERS + HEAD_TRICKLERS + BODY_TRICKLERS)
STREAMED_BYTES = 1 << 30


async def big_or_ok(conn: RawConn) -> None:
    """``/public/big`` is an endless body, anything else OK. A small send buffer keeps what
    the kernel queues towards tokengate for a stalled relay small."""
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    while (request := await conn.read_request()) is not None:
        if not request.target.startswith("/public/big"):
            await conn.send(OK)
            continue
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % STREAMED_BYTES)
        chunk = b"x" * 65536
        while True:
            await conn.send(chunk)


@dataclass
class Stalled:
    """When a slow client last did something, and when tokengate closed it."""

    kind: str
    active_until: float = 0.0  # before it connected, its last byte, or its request
    closed_at: float = 0.0
    answer: bytes = b""


@dataclass
class Served:
    latencies_s: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@contextlib.contextmanager
def soft_open_files(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limit(pid: int) -> int:
    """The soft ``Max open files`` of a process, as the kernel reports it."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)", limits, flags=re.MULTILINE)
    assert found is not None, limits
    return int(found.group(1))


@pytest.fixture
async def upstream() -> AsyncIterator[RawServer]:
    async with raw_servers() as start:
        yield await start(big_or_ok)


@pytest.fixture
def gateway(upstream: RawServer) -> Iterator[GatewayProcess]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < OPEN_FILES_NEEDED:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {OPEN_FILES_NEEDED}")
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "public_url": f"http://127.0.0.1:{port}",
        "log": {"access_log": False},
        "limits": {
            "shutdown_delay_s": 0,
            "shutdown_grace_s": 1,
            "client_header_timeout_s": TIMEOUT_S,
            "client_body_timeout_s": TIMEOUT_S,
            "send_timeout_s": TIMEOUT_S,
            "keepalive_timeout_s": 30,
            "max_connections": 2000,
        },
        "routes": [
            {"prefix": "/public", "upstream": f"http://127.0.0.1:{upstream.port}", "auth": "none"}
        ],
    }
    # Started with systemd's default soft limit: raising its own is tokengate's job.
    with soft_open_files(1024):
        process = GatewayProcess(config).start()
    try:
        assert process.process is not None
        assert open_files_limit(process.process.pid) == hard
        yield process
    finally:
        process.stop()


@pytest.fixture
async def hangups() -> AsyncIterator[Hangups]:
    watch = Hangups()
    yield watch
    watch.close()


@pytest.fixture
def open_files() -> Iterator[None]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with soft_open_files(hard):
        yield


async def head_trickler(port: int, stalled: Stalled) -> None:
    loop = asyncio.get_running_loop()
    # Before connecting: in a burst of connections, this loop may learn of this one's
    # being open later than tokengate does, which times its head from then.
    stalled.active_until = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed = asyncio.ensure_future(read_until_closed(reader))
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    while not closed.done():  # a byte at a time, never the end of the head
        with contextlib.suppress(ConnectionError):
            writer.write(b"z")
        await asyncio.wait([closed], timeout=TRICKLE_EVERY_S)
    stalled.closed_at = loop.time()
    stalled.answer = closed.result()
    writer.close()


async def body_trickler(port: int, stalled: Stalled) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed = asyncio.ensure_future(read_until_closed(reader))
    writer.write(b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(4):  # one timeout of trickling, then silence
        writer.write(b"1\r\nx\r\n")
        stalled.active_until = loop.time()
        await asyncio.wait([closed], timeout=TRICKLE_EVERY_S)
    stalled.answer = await closed
    stalled.closed_at = loop.time()
    writer.close()


async def non_reader(port: int, stalled: Stalled, hangups: Hangups) -> None:
    sock = await open_non_reader(port, get(b"/public/big"))
    stalled.active_until = asyncio.get_running_loop().time()
    try:
        stalled.closed_at = await hangups.watch(sock)
    finally:
        sock.close()


async def keep_asking(port: int, served: Served, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    url = f"http://127.0.0.1:{port}/public/x"
    async with aiohttp.ClientSession() as client:
        while not stop.is_set():
            started = loop.time()
            async with client.get(url) as response:
                await response.read()
                served.statuses.append(response.status)
            served.latencies_s.append(loop.time() - started)


async def scrape(admin_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as client, client.get(f"{admin_url}/metrics") as resp:
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_thousand_stalled_connections_are_closed_in_time_while_others_get_200s(
    open_files: None, gateway: GatewayProcess, upstream: RawServer, hangups: Hangups
) -> None:
    port = int(gateway.config["listen"]["port"])
    stalled = (
        [Stalled("head") for _ in range(HEAD_TRICKLERS)]
        + [Stalled("body") for _ in range(BODY_TRICKLERS)]
        + [Stalled("send") for _ in range(NON_READERS)]
    )
    served = Served()
    stop = asyncio.Event()
    askers = [asyncio.ensure_future(keep_asking(port, served, stop)) for _ in range(4)]
    slow = []
    for client in stalled:
        if client.kind == "head":
            slow.append(head_trickler(port, client))
        elif client.kind == "body":
            slow.append(body_trickler(port, client))
        else:
            slow.append(non_reader(port, client, hangups))
    async with asyncio.timeout(30):
        await asyncio.gather(*slow)
        stop.set()
        await asyncio.gather(*askers)

    for kind, timeout_s in (("head", TIMEOUT_S), ("body", TIMEOUT_S), ("send", TIMEOUT_S)):
        waits = [c.closed_at - c.active_until for c in stalled if c.kind == kind]
        assert min(waits) >= timeout_s - 0.1, (kind, min(waits))
        assert max(waits) <= timeout_s + MARGIN_S, (kind, max(waits))
    # A head cut short gets its 408 when the close does not overtake it; a stalled body
    # always does (nothing of the response had gone).
    for client in stalled:
        if client.answer or client.kind == "body":
            assert parse_response(client.answer)[0] == 408
    assert set(served.statuses) == {200}
    assert len(served.statuses) >= 20
    # Measured here: a median of 2 ms, the slowest 1.3 s (meanwhile tokengate relays some
    # 450 MB, from the upstream in this process into the stalled readers' kernel buffers);
    # never a 504 for want of an upstream connection.
    assert statistics.median(served.latencies_s) < 0.25
    assert max(served.latencies_s) < 3.0

    metrics = await scrape(gateway.admin_url)
    timeouts = {
        kind: metrics.get(("tokengate_client_timeouts_total", (("kind", kind),)), 0.0)
        for kind in ("head", "body", "send")
    }
    assert timeouts == {"head": HEAD_TRICKLERS, "body": BODY_TRICKLERS, "send": NON_READERS}
    assert metrics[("tokengate_connections_refused_total", ())] == 0
    log = gateway.log()
    assert "Traceback" not in log
    assert '"level":"error"' not in log

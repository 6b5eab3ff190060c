"""The raw HTTP/1.1 servers of ``tests.fakes.raw_http``, and a pool closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.http1 import Http1Pool
from tests.fakes.raw_http import StartServer, raw_servers


@pytest.fixture
async def raw_server() -> AsyncIterator[StartServer]:
    async with raw_servers() as start:
        yield start


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    async with Http1Pool(limit_per_host=8, idle_timeout_s=30) as pool:
        yield pool

"""The refresh storm: many concurrent requests on one session whose access token expired.

tokengate must ask the IdP once (single flight per session, a lock in Redis across
processes) and answer every request 200 with the refreshed token. One round, driven by
``run.py``:

1. the driver seeds a session whose access token has expired, with a refresh token the
   issuer has not seen (``seed.py``) and reads the issuer's ``/__stats``;
2. :func:`fire` opens ``requests`` keep-alive connections by sending that many concurrent
   requests with a *valid* session (so client→tokengate and tokengate→Redis connections
   exist, as in a running deployment); sends that burst again, timed: the no-refresh
   baseline (what ``requests`` concurrent requests cost this client and tokengate without
   any refresh); then sends ``requests`` concurrent requests with the expired session
   over the same connections and times each (send to last body byte);
3. ``/__stats`` again: the refresh grants of this round (must be exactly 1) and the time
   the issuer spent in its ``/token`` handler for each (the IdP's own token latency).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from procs import BenchError, http_get

MARGIN_MS = 50.0  # the target: p99 <= the IdP's token latency + 50 ms


@dataclass(frozen=True, slots=True)
class IssuerStats:
    grants: int
    rejected: int
    token_ms: tuple[float, ...]  # handler time of each grant, oldest first (bounded)


def issuer_stats(issuer_url: str) -> IssuerStats:
    status, body = http_get(f"{issuer_url}/__stats")
    if status != 200:
        raise BenchError(f"issuer /__stats answered {status}")
    data: dict[str, Any] = json.loads(body)
    return IssuerStats(
        grants=int(data["grants"]["refresh_token"]),
        rejected=int(data["rejected"]),
        token_ms=tuple(float(v) for v in data["token_ms"]),
    )


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank: the smallest value with at least ``p`` % of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class StormRound:
    round: int
    statuses: tuple[int, ...]  # 0: no answer (connection error or timeout)
    latencies_ms: tuple[float, ...]
    baseline_ms: tuple[float, ...]  # the same burst on a valid session, no refresh
    grants: int  # refresh grants the issuer answered during the round
    rejected: int  # token requests the issuer refused during the round
    idp_ms: tuple[float, ...]  # handler time of each of those grants

    @property
    def requests(self) -> int:
        return len(self.statuses)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if s == 200)

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    @property
    def baseline_p99_ms(self) -> float:
        return percentile(self.baseline_ms, 99)

    @property
    def idp_latency_ms(self) -> float | None:
        return max(self.idp_ms) if self.idp_ms else None

    @property
    def within_target(self) -> bool | None:
        idp = self.idp_latency_ms
        return None if idp is None else self.percentile(99) <= idp + MARGIN_MS

    @property
    def problems(self) -> list[str]:
        """What makes this round fail (not the latency target: that is a measurement)."""
        found = []
        if self.ok != self.requests:
            found.append(f"{self.requests - self.ok} of {self.requests} requests were not 200")
        if self.grants != 1:
            found.append(f"{self.grants} refresh grants at the issuer, expected 1")
        if self.rejected:
            found.append(f"{self.rejected} token requests rejected by the issuer")
        return found


async def _one(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str]
) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        async with http.get(url, headers=headers) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    return status, (time.perf_counter() - started) * 1000


Burst = list[tuple[int, float]]  # (status, latency ms) of each request


async def _fire(
    url: str,
    warm_headers: Mapping[str, str],
    storm_headers: Mapping[str, str],
    requests: int,
    timeout_s: float,
) -> tuple[Burst, Burst, Burst]:
    connector = aiohttp.TCPConnector(limit=requests, limit_per_host=0)
    async with (
        asyncio.timeout(4 * timeout_s),
        aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),  # only the Cookie header we send
        ) as http,
    ):

        async def burst(headers: Mapping[str, str]) -> Burst:
            return await asyncio.gather(*(_one(http, url, headers) for _ in range(requests)))

        warm = await burst(warm_headers)
        baseline = await burst(warm_headers)
        storm = await burst(storm_headers)
    return warm, baseline, storm


def fire(
    url: str,
    warm_headers: Mapping[str, str],
    storm_headers: Mapping[str, str],
    requests: int,
    timeout_s: float = 20.0,
) -> tuple[list[int], Burst, Burst]:
    """Open ``requests`` connections with a burst of ``warm_headers`` requests, time a
    second such burst, then send ``requests`` at once with ``storm_headers``:
    (statuses of both valid-session bursts, the timed one, the storm)."""
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"refusing a non-loopback target {url}")
    warm, baseline, storm = asyncio.run(
        _fire(url, warm_headers, storm_headers, requests, timeout_s)
    )
    return [status for status, _ in warm + baseline], baseline, storm


def storm_round(
    round_: int, baseline: Burst, storm: Burst, before: IssuerStats, after: IssuerStats
) -> StormRound:
    grants = after.grants - before.grants
    return StormRound(
        round=round_,
        statuses=tuple(status for status, _ in storm),
        latencies_ms=tuple(ms for _, ms in storm),
        baseline_ms=tuple(ms for _, ms in baseline),
        grants=grants,
        rejected=after.rejected - before.rejected,
        idp_ms=after.token_ms[len(after.token_ms) - grants :] if grants > 0 else (),
    )

"""tokengate's Prometheus metrics (the README's table), owned by one ``Metrics`` per process.

Each instance has its own registry (no module-level globals), so tests can build many.
With ``workers > 1`` the CLI sets up prometheus-client's multiprocess mode before any
metric exists, and ``render`` aggregates every worker's values. Labels are bounded: route
names, methods, status codes and results, never a raw path or a subject.

What every request counts (``observe_request``, ``observe_upstream``, ``add``) is added up
in plain dicts and folded into prometheus-client's values by ``flush``: each of its values
takes a lock, a histogram walks its buckets, and together that was ~16 Python calls per
request. ``flush`` runs before anything reads the registry in this thread (a collector
registered first), before ``/metrics`` renders, and every ``FLUSH_EVERY_S`` while the app
runs (``start_flushing``: other workers' scrapes read the shared files meanwhile).
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FLUSH_EVERY_S = 1.0  # how stale another worker's counts may be when a scrape reads them


class _Observed:
    """A labelled histogram's observations since the last flush: counts by bucket (the
    last is +Inf, as prometheus-client's), their sum, and the newest exemplar by bucket."""

    __slots__ = ("counts", "exemplars", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.exemplars: dict[int, Exemplar] = {}


class _FlushFirst(Collector):
    """Registered first: a read of the registry in the thread that counts (a scrape's
    render runs in another, after ``flush``) sees every count so far."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        if threading.get_ident() == self._metrics.owner_thread:
            self._metrics.flush()
        return ()

    def describe(self) -> Iterable[Any]:
        return ()


CONTENT_TYPE = CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics_exposition.CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, *, multiprocess_mode: bool = False) -> None:
        # multiprocess_mode: the CLI has set PROMETHEUS_MULTIPROC_DIR (workers > 1) before
        # prometheus-client was imported, so every value lives in a shared mmap file.
        self.multiprocess_mode = multiprocess_mode
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Counts of this process not yet in the registry (see the module's docstring); only
        # the thread that made this object (the event loop's) counts.
        self.owner_thread = threading.get_ident()
        self._counted: dict[tuple[Counter, tuple[str, ...]], int] = {}
        self._answered: dict[tuple[str, str, int], int] = {}  # by route, method, status
        self._observed: dict[tuple[Histogram, str], _Observed] = {}
        self._flusher: asyncio.TimerHandle | None = None
        r.register(_FlushFirst(self))
        self.http_requests_total = Counter(
            "tokengate_http_requests_total",
            "Requests answered, by route name, method and status code.",
            ("route", "method", "code"),
            registry=r,
        )
        self.http_request_duration_seconds = Histogram(
            "tokengate_http_request_duration_seconds",
            "Time from request to the end of the response, by route name.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_parse_errors_total = Counter(
            "tokengate_http_parse_errors_total",
            "Request heads the HTTP parser refused, by reason: header_too_large (431), "
            "uri_too_long (414), bad_request (400).",
            ("reason",),
            registry=r,
        )
        self.client_timeouts_total = Counter(
            "tokengate_client_timeouts_total",
            "Client connections closed for a timeout, by kind: head, body, send, keepalive.",
            ("kind",),
            registry=r,
        )
        self.open_connections = Gauge(
            "tokengate_open_connections",
            "Client connections open on the public port.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused_total = Counter(
            "tokengate_connections_refused_total",
            "Client connections closed on arrival: limits.max_connections were open.",
            registry=r,
        )
        self.upstream_request_duration_seconds = Histogram(
            "tokengate_upstream_request_duration_seconds",
            "Time the upstream took to answer with headers, by route name.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_validations_total = Counter(
            "tokengate_token_validations_total",
            "Bearer token validations, by provider (- when none could be picked) and result.",
            ("provider", "result"),
            registry=r,
        )
        self.introspection_total = Counter(
            "tokengate_introspection_total",
            "Calls to a provider's introspection endpoint (RFC 7662), by result: active, "
            "inactive, error.",
            ("provider", "result"),
            registry=r,
        )
        self.introspection_duration_seconds = Histogram(
            "tokengate_introspection_duration_seconds",
            "Introspection call latency, by provider.",
            ("provider",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.introspection_cache_total = Counter(
            "tokengate_introspection_cache_total",
            "Introspection answers by where they came from: hit (this process), shared "
            "(Redis), stale (past its TTL, the endpoint unavailable), miss (asked the endpoint).",
            ("provider", "result"),
            registry=r,
        )
        self.dpop_proofs_total = Counter(
            "tokengate_dpop_proofs_total",
            "DPoP proofs checked at ingress, by result (valid, or why not).",
            ("result",),
            registry=r,
        )
        self.refresh_total = Counter(
            "tokengate_refresh_total",
            "Access-token refreshes, by result (backoff: one not tried, the IdP having failed).",
            ("result",),
            registry=r,
        )
        self.refresh_backoff_sessions = Gauge(
            "tokengate_refresh_backoff_sessions",
            "Sessions this process knows to be in refresh backoff after failed refreshes (its "
            "own, or read from the store); summed over workers, a session two know counts twice.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refresh_saves_pending = Gauge(
            "tokengate_refresh_saves_pending",
            "Refreshed sessions whose rotated tokens this process holds because the store "
            "could not take them yet; written late (refresh_total saved_late) or lost "
            "(save_lost) within the refresh lock's TTL.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refresh_lock_wait_seconds = Histogram(
            "tokengate_refresh_lock_wait_seconds",
            "Time a request waited for a session's refresh (lock or single flight).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.idp_request_duration_seconds = Histogram(
            "tokengate_idp_request_duration_seconds",
            "IdP call latency, by call.",
            ("call",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.jwks_fetch_total = Counter(
            "tokengate_jwks_fetch_total", "JWKS fetches, by result.", ("result",), registry=r
        )
        self.session_store_errors_total = Counter(
            "tokengate_session_store_errors_total",
            "Session store operations that failed.",
            registry=r,
        )
        self.session_store_unreplicated_total = Counter(
            "tokengate_session_store_unreplicated_total",
            "Writes (lock: a refresh lock, session: a refreshed session) that fewer than "
            "session.wait_replicas replicas acknowledged within session.wait_timeout_s.",
            ("write",),
            registry=r,
        )
        self.session_cache_total = Counter(
            "tokengate_session_cache_total",
            "Session reads by how this process's local cache answered them.",
            ("result",),
            registry=r,
        )
        self.sessions_created_total = Counter(
            "tokengate_sessions_created_total", "Sessions created at login.", registry=r
        )
        self.sessions_ended_total = Counter(
            "tokengate_sessions_ended_total",
            "Sessions ended, by reason.",
            ("reason",),
            registry=r,
        )
        self.ready = Gauge(
            "tokengate_ready",
            "1 when this process answers /readyz with 200.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        if not multiprocess_mode:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: prometheus-client's lookup takes a lock and
        validates every call, and it sits on the path of every request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_request(
        self, route: str, method: str, status: int, elapsed_s: float, trace_id: str | None = None
    ) -> None:
        """Count one answered request. A sampled request's trace id becomes the latency's
        exemplar (OpenMetrics only; none in multiprocess mode, which prometheus-client
        cannot aggregate them in)."""
        answered = self._answered
        key = (route, method, status)
        answered[key] = answered.get(key, 0) + 1
        self.observe(self.http_request_duration_seconds, route, elapsed_s, trace_id)

    def add(self, counter: Counter, *labels: str) -> None:
        """``counter.labels(*labels).inc()``, folded in by the next ``flush``."""
        counted = self._counted
        key = (counter, labels)
        counted[key] = counted.get(key, 0) + 1

    def observe(
        self, histogram: Histogram, label: str, value: float, trace_id: str | None = None
    ) -> None:
        """``histogram.labels(label).observe(value)`` for a histogram of one label and the
        latency buckets, folded in by the next ``flush``."""
        key = (histogram, label)
        observed = self._observed.get(key)
        if observed is None:
            observed = self._observed[key] = _Observed()
        bucket = bisect_left(_LATENCY_BUCKETS, value)  # the first bound >= value, or +Inf
        observed.counts[bucket] += 1
        observed.total += value
        if trace_id is not None and not self.multiprocess_mode:
            observed.exemplars[bucket] = Exemplar({"trace_id": trace_id}, value, time.time())

    def flush(self) -> None:
        """Fold what was counted since the last flush into the registry's values."""
        counted, self._counted = self._counted, {}
        for (counter, labels), count in counted.items():
            self.child(counter, *labels).inc(count)
        answered, self._answered = self._answered, {}
        for (route, method, status), count in answered.items():
            self.child(self.http_requests_total, route, method, str(status)).inc(count)
        observed, self._observed = self._observed, {}
        for (histogram, label), seen in observed.items():
            child = self.child(histogram, label)
            # prometheus-client's own parts of a histogram (tests/unit/test_metrics.py holds
            # a fold to what observe() makes of the same values).
            child._sum.inc(seen.total)
            buckets = child._buckets
            for bucket, count in enumerate(seen.counts):
                if count:
                    buckets[bucket].inc(count)
            for bucket, exemplar in seen.exemplars.items():
                buckets[bucket].set_exemplar(exemplar)

    def start_flushing(self) -> None:
        """Flush every ``FLUSH_EVERY_S`` on the running loop until ``stop_flushing``."""
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self._tick)

    def stop_flushing(self) -> None:
        """Stop the timer and fold in what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()

    def observe_bad_head(self, reason: str, status: int) -> None:
        """Count a request head the parser refused: by reason, and as an answered request of
        no route. No latency is observed: no handler ran, and the head's start is unknown."""
        self.child(self.http_parse_errors_total, reason).inc()
        self.child(self.http_requests_total, "-", "other", str(status)).inc()

    def observe_client_timeout(self, kind: str, status: int | None) -> None:
        """Count a connection timed out in one phase (``kind``); one that was answered (a 408
        to a head) is also an answered request of no route, as a refused head is."""
        self.child(self.client_timeouts_total, kind).inc()
        if status is not None:
            self.child(self.http_requests_total, "-", "other", str(status)).inc()

    def render(self, *, openmetrics: bool = False) -> bytes:
        """The exposition text: this process's registry, or every worker's in multiprocess;
        OpenMetrics (with exemplars) when the scraper asked for it. Call ``flush`` first, in
        the counting thread, when rendering in another."""
        if not self.multiprocess_mode:
            if openmetrics:
                exposition: bytes = openmetrics_exposition.generate_latest(self.registry)  # type: ignore[no-untyped-call]  # untyped lib
                return exposition
            return generate_latest(self.registry)
        scrape = CollectorRegistry()
        multiprocess.MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]  # untyped lib
        return generate_latest(scrape)

"""The per-request counts are added up in dicts and folded into prometheus-client's values
(``Metrics.flush``): what a reader sees must be what prometheus-client's own ``inc`` and
``observe`` would have made, and it must see it whenever it reads."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.samples import Sample

import gateway.metrics
from gateway.metrics import Metrics

DURATION = "tokengate_http_request_duration_seconds"
REQUESTS = "tokengate_http_requests_total"


def samples(metrics: Metrics, name: str) -> list[Sample]:
    """Every sample of the family ``name``, without timestamps or exemplars."""
    return [
        Sample(s.name, s.labels, s.value)
        for family in metrics.registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    ]


durations = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=100, allow_nan=False),
        st.sampled_from([0.001, 0.0025, 0.005, 1.0, 30.0, 30.000001]),  # on a bound, past all
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(
    observed=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["GET", "POST"]), durations),
        max_size=4,
    )
)
def test_a_fold_is_what_prometheus_client_makes_of_the_same_requests(
    observed: list[tuple[str, str, list[float]]],
) -> None:
    batched, direct = Metrics(), Metrics()
    for route, method, values in observed:
        for value in values:
            batched.observe_request(route, method, 200, value)
            direct.http_requests_total.labels(route, method, "200").inc()
            direct.http_request_duration_seconds.labels(route).observe(value)
    for name in (REQUESTS.removesuffix("_total"), DURATION):
        assert samples(batched, name) == samples(direct, name)


def test_counts_reach_the_registry_once_each_whoever_reads() -> None:
    metrics = Metrics()
    metrics.add(metrics.token_validations_total, "oidc", "valid_cached")
    metrics.add(metrics.token_validations_total, "oidc", "valid_cached")
    labels = {"provider": "oidc", "result": "valid_cached"}
    # A read in the counting thread folds first; a second read counts nothing twice.
    assert metrics.registry.get_sample_value("tokengate_token_validations_total", labels) == 2
    assert metrics.registry.get_sample_value("tokengate_token_validations_total", labels) == 2
    metrics.add(metrics.token_validations_total, "oidc", "valid_cached")
    metrics.flush()
    metrics.flush()
    assert metrics.registry.get_sample_value("tokengate_token_validations_total", labels) == 3


async def test_a_read_in_another_thread_sees_what_was_flushed_and_the_timer_flushes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = Metrics()
    labels = {"route": "a", "method": "GET", "code": "200"}

    def read() -> float | None:  # as /metrics renders: in a thread of its own
        return metrics.registry.get_sample_value(REQUESTS, labels)

    metrics.observe_request("a", "GET", 200, 0.002)
    assert await asyncio.to_thread(read) is None  # that thread may not fold: it would race
    monkeypatch.setattr(gateway.metrics, "FLUSH_EVERY_S", 0)
    metrics.start_flushing()
    try:
        async with asyncio.timeout(5):
            while await asyncio.to_thread(read) != 1:
                pass  # each round trip to the thread lets the loop run the timer
        metrics.observe_request("a", "GET", 200, 0.002)
    finally:
        metrics.stop_flushing()  # folds what is left
    assert await asyncio.to_thread(read) == 2


def test_the_newest_sampled_request_of_a_bucket_is_its_exemplar() -> None:
    metrics = Metrics()
    metrics.observe_request("a", "GET", 200, 0.0015, "1" * 32)
    metrics.observe_request("a", "GET", 200, 0.0020, "2" * 32)
    metrics.observe_request("a", "GET", 200, 0.0021)  # unsampled: no exemplar
    metrics.observe_request("a", "GET", 200, 3.0, "3" * 32)
    text = openmetrics_latest(metrics.registry).decode()  # type: ignore[no-untyped-call]
    bucket = 'tokengate_http_request_duration_seconds_bucket{le="0.0025",route="a"} 3.0'
    assert f'{bucket} # {{trace_id="{"2" * 32}"}} 0.002' in text
    assert f'le="5.0",route="a"}} 4.0 # {{trace_id="{"3" * 32}"}} 3.0' in text
    assert "1" * 32 not in text


def test_multiprocess_mode_keeps_no_exemplar() -> None:
    metrics = Metrics()
    metrics.multiprocess_mode = True  # as the CLI's workers > 1 (files aside)
    metrics.observe_request("a", "GET", 200, 0.002, "1" * 32)
    metrics.flush()
    child = metrics.http_request_duration_seconds.labels("a")
    assert all(bucket.get_exemplar() is None for bucket in child._buckets)

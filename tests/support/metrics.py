"""Reading tokengate's metrics in tests."""

from __future__ import annotations

from gateway.metrics import Metrics

SESSION_CACHE_RESULTS = ("hit", "miss", "shared", "off")


def session_cache_reads(metrics: Metrics) -> dict[str, float]:
    """``tokengate_session_cache_total`` by result, leaving out results never counted."""
    values = {
        result: metrics.registry.get_sample_value(
            "tokengate_session_cache_total", {"result": result}
        )
        for result in SESSION_CACHE_RESULTS
    }
    return {result: value for result, value in values.items() if value}

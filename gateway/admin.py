"""The admin port: ``/healthz`` (alive), ``/readyz`` (ready for traffic), ``/metrics``.

Never served on the public port. Readiness is the conjunction of the checks registered by
the components that own them (keys loaded, session store reachable) and not draining;
what each check means is its owner's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError
from gateway.metrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE, Metrics

ReadinessCheck = Callable[[], Awaitable[bool]]
_CHECK_TIMEOUT_S = 2.0


class Readiness:
    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}
        self.draining = False

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def remove_check(self, name: str) -> None:
        self._checks.pop(name, None)

    async def evaluate(self) -> dict[str, bool]:
        results = {"accepting": not self.draining}
        for name, check in list(self._checks.items()):
            try:
                results[name] = await asyncio.wait_for(check(), _CHECK_TIMEOUT_S)
            except (TimeoutError, OSError, GatewayError):
                results[name] = False
        return results


def build_admin_app(readiness: Readiness, metrics: Metrics) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        results = await readiness.evaluate()
        ready = all(results.values())
        metrics.ready.set(1 if ready else 0)
        return web.json_response({"ready": ready, "checks": results}, status=200 if ready else 503)

    async def metrics_handler(request: web.Request) -> web.Response:
        # Prometheus asks for OpenMetrics (and so gets the exemplars) when it can read it.
        openmetrics = "application/openmetrics-text" in request.headers.get("Accept", "")
        openmetrics = openmetrics and not metrics.multiprocess_mode
        metrics.flush()  # here, in the thread that counts; rendering is another's
        body = await asyncio.to_thread(metrics.render, openmetrics=openmetrics)
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE
        return web.Response(body=body, headers={"Content-Type": content_type})

    admin = web.Application()
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics_handler)
    return admin

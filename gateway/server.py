"""Serving: sockets for the public and admin apps, signals, graceful drain, workers.

On SIGTERM (or SIGINT) the process answers not-ready at once, waits ``shutdown_delay_s`` so
load balancers notice, stops accepting, lets in-flight requests finish within
``shutdown_grace_s``, closes every resource (the apps' cleanup contexts) and exits 0.
With ``workers > 1`` each worker is a process of its own bound with SO_REUSEPORT. Each
raises its open-file limit to the hard limit first (nginx's ``worker_rlimit_nofile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal

from aiohttp import web

from gateway.admin import Readiness, build_admin_app
from gateway.app import ENTRY, build_app
from gateway.http_server import GatewayRunner
from gateway.ingress import aiohttp_parser_limits
from gateway.metrics import Metrics
from gateway.settings import Settings

log = logging.getLogger(__name__)


def build_runners(
    settings: Settings, metrics: Metrics, readiness: Readiness
) -> tuple[GatewayRunner, GatewayRunner]:
    """The public app's runner and the admin app's, not yet set up or bound: ``serve``
    binds them to the configured ports, tests to port 0."""
    app = build_app(settings, metrics=metrics, readiness=readiness)
    limits = settings.limits
    runner = GatewayRunner(
        app,
        entry=app[ENTRY],
        limits=limits,
        max_connections=limits.max_connections,
        metrics=metrics,
        access_log=None,
        shutdown_timeout=limits.shutdown_grace_s,
    )
    # The admin app has no handler_args: the same parser limits, so that a refused line
    # is told apart there too. Its refused heads are logged, not counted, like its requests.
    # The same timeouts, but no cap: a flood on the public port leaves probes their way in.
    admin_runner = GatewayRunner(
        build_admin_app(readiness, metrics),
        limits=limits,
        access_log=None,
        shutdown_timeout=1.0,
        **aiohttp_parser_limits(limits),
    )
    return runner, admin_runner


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the soft limit.

    Every client connection is a descriptor, and a proxied request holds one more upstream;
    a soft limit of 1024 (systemd's default) would fail accepts long before
    ``limits.max_connections``, for the admin port too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):  # an infinite hard limit, say
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run one worker until ``stop`` is set or a SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics(multiprocess_mode=settings.workers > 1)
    readiness = Readiness()
    runner, admin_runner = build_runners(settings, metrics, readiness)
    limits = settings.limits
    open_files = raise_open_file_limit()
    # Each client connection may hold an upstream one; some are left for the rest.
    if open_files < 2 * limits.max_connections + 64:
        log.warning(
            "open_file_limit_low",
            extra={"open_files": open_files, "max_connections": limits.max_connections},
        )
    reuse_port = settings.workers > 1
    await runner.setup()
    try:
        await admin_runner.setup()
        await web.TCPSite(
            admin_runner, settings.admin.host, settings.admin.port, reuse_port=reuse_port
        ).start()
        await web.TCPSite(
            runner,
            settings.listen.host,
            settings.listen.port,
            reuse_port=reuse_port,
            backlog=1024,
        ).start()
        # Start-up objects are permanent: freeze them out of the collector's sight and let
        # young generations grow, so the hot path pays for fewer collections.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        log.info(
            "started",
            extra={"port": settings.listen.port, "admin_port": settings.admin.port},
        )
        await stop.wait()
        readiness.draining = True
        log.info("draining", extra={"delay_s": limits.shutdown_delay_s})
        if limits.shutdown_delay_s:
            await asyncio.sleep(limits.shutdown_delay_s)  # let endpoints controllers catch up
    finally:
        await runner.cleanup()  # stops accepting, waits for in-flight requests, then cleanups
        await admin_runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")

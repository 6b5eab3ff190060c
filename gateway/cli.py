"""The ``tokengate`` command: ``run`` and ``check-config``.

``check-config`` prints the effective configuration with secrets masked, or the keys that
are wrong, and exits non-zero. ``run`` starts the proxy and the admin server, one process
per worker. Everything after argument parsing is ``server``'s job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from gateway import preflight
from gateway.settings import ConfigError, Settings, dump_settings, load_settings

_CONFIG_HELP = "YAML configuration file (TOKENGATE_* environment variables override it)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokengate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "start the proxy and the admin server"),
        ("check-config", "validate and print the effective configuration"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--config", "-c", default=os.environ.get("TOKENGATE_CONFIG"), help=_CONFIG_HELP
        )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        # The same checks for both commands: what check-config accepts, run starts with.
        asyncio.run(preflight.check(settings))
    except ConfigError as exc:
        print(f"tokengate: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(dump_settings(settings), indent=2))
        return 0
    return run(settings, args.config)


def run(settings: Settings, config_path: str | None) -> int:
    if settings.workers == 1:
        _serve(settings)
        return 0
    return _supervise(settings.workers, config_path)


def _serve(settings: Settings) -> None:
    # Imported here, not at the top: with workers > 1 prometheus-client must first see
    # PROMETHEUS_MULTIPROC_DIR, which the supervisor sets before spawning this process.
    from gateway.logs import configure_logging
    from gateway.server import serve

    configure_logging(settings.log)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


def _worker(config_path: str | None) -> None:
    _serve(load_settings(config_path))


def _supervise(workers: int, config_path: str | None) -> int:
    """Start ``workers`` processes sharing the ports; forward signals; exit with them."""
    metrics_dir = tempfile.mkdtemp(prefix="tokengate-metrics-")
    # prometheus-client reads this when first imported: the children import it after us.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_worker, args=(config_path,), name=f"tokengate-worker-{i}")
        for i in range(workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    for child in children:
        child.join()
        if child.exitcode != 0 and not failed:
            failed = True
            forward(signal.SIGTERM, None)  # one worker died: take the pod down, let k8s restart
    for path in Path(metrics_dir).glob("*.db"):
        path.unlink(missing_ok=True)
    Path(metrics_dir).rmdir()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

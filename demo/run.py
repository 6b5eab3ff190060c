"""Run the tokengate demo on localhost: an OpenID Provider, Redis, a sample API, a small SPA
and tokengate in front of them. Open the printed URL, log in with any username and
password, and watch API calls keep succeeding while the 30 s access tokens expire and
tokengate refreshes them. Ctrl-C (or SIGTERM) stops everything.

With the demo running, `demo/run.py --token` prints an access token from its IdP, for
`curl -H "Authorization: Bearer $TOKEN" http://localhost:8080/api/me`.

Every port has a fixed default and an environment variable (a flag wins over both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python demo/run.py` puts demo/ there, not the root

import aiohttp  # noqa: E402

from demo.stack import PORT_ENV, DemoError, DemoPorts, DemoStack  # noqa: E402

DEFAULT_LOG_DIR = REPO_ROOT / ".demo"  # git-ignored


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    try:
        ports = DemoPorts.from_env()
    except DemoError as exc:
        parser.error(str(exc))
    for name, port in ports.items():
        parser.add_argument(
            f"--{name}-port",
            type=int,
            default=port,
            metavar="PORT",
            help=f"{name} port (env {PORT_ENV[name]}, default {getattr(DemoPorts(), name)})",
        )
    parser.add_argument(
        "--access-token-ttl",
        type=int,
        default=int(os.environ.get("DEMO_ACCESS_TOKEN_TTL", "30")),
        metavar="S",
        help="access-token lifetime at the IdP (env DEMO_ACCESS_TOKEN_TTL, default 30)",
    )
    parser.add_argument(
        "--store",
        choices=("auto", "redis", "memory"),
        default=os.environ.get("DEMO_STORE", "auto"),
        help="session store; auto = Redis when redis-server is installed (env DEMO_STORE)",
    )
    parser.add_argument(
        "--token",
        action="store_true",
        help="do not start anything: print an access token from the running demo's IdP",
    )
    parser.add_argument(
        "--user", default="alice", help="the username --token logs in as (default alice)"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path(os.environ.get("DEMO_LOG_DIR", DEFAULT_LOG_DIR)),
        help="where every process logs (env DEMO_LOG_DIR, default .demo/)",
    )
    return parser.parse_args(argv)


def banner(stack: DemoStack) -> str:
    store = (
        f"Redis at {stack.redis_url}"
        if stack.redis_url
        else "in tokengate's memory (sessions end with the demo)"
    )
    return f"""
  tokengate demo is running.

  Open            {stack.url}/
  Log in with     any username and password, e.g. alice / demo
  Metrics         {stack.metrics_url}
  IdP (issuer)    {stack.idp_url}
  API (direct)    {stack.api_url}/api/me   (401 without a token: go through tokengate)
  Bearer token    TOKEN=$({token_command(stack)})
                  curl -H "Authorization: Bearer $TOKEN" {stack.url}/api/me
  Sessions        {store}
  Access tokens   live {stack.access_token_ttl_s} s, refreshed {stack.refresh_ahead_s:g} s early
  Logs            {stack.log_dir}/  (tail -f {stack.log_dir}/tokengate.log)

  Press Ctrl-C to stop.
"""


def port_flags(stack: DemoStack) -> str:
    """The port flags --token needs to find this stack, when not the defaults."""
    defaults = DemoPorts()
    return "".join(
        f" --{name}-port {port}"
        for name, port in stack.ports.items()
        if name in ("gateway", "idp") and port != getattr(defaults, name)
    )


def token_command(stack: DemoStack) -> str:
    python, script = os.path.relpath(sys.executable), os.path.relpath(__file__)
    return f"{python} {script} --token{port_flags(stack)}"


def print_token(stack: DemoStack, username: str) -> int:
    try:
        print(asyncio.run(stack.fetch_access_token(username)))
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:  # DemoError, IdpError: Runtime
        print(f"demo: no token ({exc}); is the demo running on these ports?", file=sys.stderr)
        return 1
    return 0


def install_stop_signals() -> None:
    """The first Ctrl-C or SIGTERM raises KeyboardInterrupt; any later one is ignored.

    Stopping must not be cut short: ``timeout make demo`` sends SIGTERM to the whole
    process group and make sends its child another, and a second KeyboardInterrupt inside
    the ``finally`` that stops the stack left its processes running. SIGINT is set too: a
    shell starts background jobs with SIGINT ignored, and Python keeps that.
    """
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ports = DemoPorts(**{name: getattr(args, f"{name}_port") for name, _ in DemoPorts().items()})
    try:
        stack = DemoStack(
            ports,
            access_token_ttl_s=args.access_token_ttl,
            refresh_ahead_s=5,
            store=args.store,
            log_dir=args.log_dir,
            own_process_group=True,
        )
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    if args.token:
        return print_token(stack, args.user)
    if stack.store == "memory" and args.store == "auto":
        print("demo: redis-server is not installed; using tokengate's memory session store")
    install_stop_signals()
    code = 0
    try:
        print(f"demo: starting (logs in {args.log_dir}/) ...", flush=True)
        stack.start()
        print(banner(stack), flush=True)
        name = stack.wait()
        print(f"demo: {name} exited unexpectedly; see {stack.log_path(name)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        pass
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        # Stopping is bounded (SIGTERM, then SIGKILL): let it finish for every child.
        print("\ndemo: stopping ...", flush=True)
        stack.stop()
        print("demo: stopped", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

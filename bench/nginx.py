"""nginx from Debian as the origin (static bodies) and as the limit (``proxy_pass``).

Each instance gets its own prefix directory (config, pid, logs, temp paths) inside the
run's temp dir, one worker, loopback only, and runs in the foreground so the driver owns
its master by pid. Keep-alive is on at both hops, as a tuned production nginx would have.
"""

from __future__ import annotations

import os
from pathlib import Path

NGINX = "/usr/sbin/nginx"
# Bodies the origin serves, by the name used in URLs and tables.
BODIES = {"200b": 200, "16k": 16 * 1024, "1m": 1024 * 1024}

_COMMON = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
"""

_ORIGIN = """\
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {root};
    }}
"""

_PROXY = """\
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 16 64k;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


def _write(prefix: Path, body: str) -> list[str]:
    prefix.mkdir(parents=True, exist_ok=True)
    # As root, nginx would hand its worker to `nobody`, who cannot read our 0700 temp dir.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(_COMMON.format(user=user, prefix=prefix, body=body))
    return [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]


def body_of(size: int) -> bytes:
    """The origin's body of ``size`` bytes (``aio-static`` answers the same)."""
    return (b"tokengate-bench\n" * (size // 16 + 1))[:size]


def origin_argv(prefix: Path, port: int) -> list[str]:
    """The origin: writes one file per body size under ``prefix/www`` and serves them."""
    root = prefix / "www"
    root.mkdir(parents=True, exist_ok=True)
    for name, size in BODIES.items():
        (root / name).write_bytes(body_of(size))
    return _write(prefix, _ORIGIN.format(port=port, root=root))


def proxy_argv(prefix: Path, port: int, upstream_port: int) -> list[str]:
    """The limit: nginx ``proxy_pass`` with a keep-alive upstream pool."""
    return _write(prefix, _PROXY.format(port=port, upstream_port=upstream_port))

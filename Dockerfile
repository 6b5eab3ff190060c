# syntax=docker/dockerfile:1
# tokengate container image.
#
# Two stages: the builder turns the project and its dependencies into wheels and installs
# them into a self-contained virtualenv; the final image copies only that virtualenv onto
# a clean python:3.11-slim, so no pip cache, build tool, test extra or source tree ships.
# Every dependency has a manylinux wheel, so neither stage needs a compiler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Same base image in both stages, so the venv's interpreter symlinks stay valid.
RUN python -m venv /opt/tokengate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Wheel the project plus its runtime dependencies and the [otel] extra (OTLP trace export;
# no [test] extra), then install from those wheels only: what is installed is exactly what
# was resolved here. pip compiles .pyc files at install time, so the read-only final image
# never needs to write one. The last line proves the console script starts.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels '.[otel]' \
 && /opt/tokengate/bin/pip install --no-cache-dir --no-index --find-links /wheels 'tokengate[otel]' \
 && /opt/tokengate/bin/tokengate --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tokengate" \
      org.opencontainers.image.description="Token handler: bearer validation and server-side browser sessions in front of your APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd
# and the Helm chart's runAsUser/fsGroup match.
RUN groupadd --system --gid 10001 tokengate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin tokengate
COPY --from=builder /opt/tokengate /opt/tokengate
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes; nothing may
# try to write outside /tmp (where tempfile puts the multiprocess metrics directory).
ENV PATH="/opt/tokengate/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
USER 10001:10001
# A writable working directory (the only one, with a read-only root filesystem).
WORKDIR /tmp
# 8080: the proxy. 9090: the admin port (/metrics /healthz /readyz); never publish it.
EXPOSE 8080 9090
# The slim image has no curl: ask /healthz with the standard library. The port follows
# TOKENGATE_ADMIN__PORT when the admin port is moved by environment.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TOKENGATE_ADMIN__PORT', '9090'), timeout=2)"]
# The configuration is mounted here (a ConfigMap in Kubernetes, -v in Docker).
ENTRYPOINT ["tokengate"]
CMD ["run", "--config", "/etc/tokengate/tokengate.yaml"]

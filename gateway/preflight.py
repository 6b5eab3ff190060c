"""What a configuration must survive before anything serves: ``run`` and ``check-config``
both pass it, so a configuration that checks is one that starts.

The schema (``settings``) judges each key; this builds what ``run`` builds from them without
touching the network: the route table, the Redis client (no connection is opened), the JSON
paths of a token API and of token capture, the client-assertion key. Building the running
objects is ``app``'s job.
"""

from __future__ import annotations

import importlib

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.idp.json_dialect import configured_paths
from gateway.idp.json_paths import split_path
from gateway.routing import RouteTable
from gateway.settings import CaptureSettings, ClientAuthSettings, ConfigError, Settings

# The key type each client-assertion algorithm signs with (RFC 7518 §3.1, RFC 8037).
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPrivateKey,),
    "PS256": (rsa.RSAPrivateKey,),
    "ES256": (ec.EllipticCurvePrivateKey,),
    "EdDSA": (ed25519.Ed25519PrivateKey,),
}


async def check(settings: Settings) -> None:
    """Build everything ``run`` would from ``settings``; ``ConfigError`` names what fails."""
    RouteTable.build(settings.routes)
    if settings.session.store == "redis" and (
        settings.uses_sessions or settings.shares_token_state
    ):
        await _check_redis(settings)
    json_api = settings.refresh.json_api
    if settings.refresh.dialect == "json" and json_api is not None:
        for path in configured_paths(json_api):
            _check_path("refresh.json.response", path)
    for index, route in enumerate(settings.routes):
        if route.capture_tokens is not None:
            _check_capture(f"routes.{index}.capture_tokens", route.capture_tokens)
    if settings.tracing.exporter != "none":
        _check_otel(settings.tracing.exporter)
    if settings.oidc.effective_client_auth == "private_key_jwt":
        _check_private_key("oidc", settings.oidc)
    for provider in settings.token_providers:
        introspection = provider.introspection
        if introspection is not None and introspection.effective_client_auth == "private_key_jwt":
            _check_private_key(f"providers.{provider.name}.introspection", introspection)


async def _check_redis(settings: Settings) -> None:
    # Imported here, as in ``app``: a gateway without a Redis store never loads redis-py.
    from gateway.sessions.redis_store import build_redis

    try:
        client = build_redis(settings.session)
    except ValueError as exc:
        raise ConfigError(f"session.redis_url: {exc}") from None
    await client.aclose()  # nothing was opened; this releases the pool object


def _check_otel(exporter: str) -> None:
    module = {
        "otlp_http": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "otlp_grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    }[exporter]
    try:
        importlib.import_module("opentelemetry.sdk.trace")
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"tracing.exporter: {exporter} needs the otel extra (pip install 'tokengate[otel]')"
        ) from None


def _check_path(key: str, dotted: str) -> None:
    try:
        split_path(dotted)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _check_capture(key: str, capture: CaptureSettings) -> None:
    paths = capture.response
    for name in ("access_token", "refresh_token", "expires_in", "token_type", "success"):
        value = getattr(paths, name)
        if value is not None:
            _check_path(f"{key}.response.{name}", value)
    if capture.subject_path is not None:
        _check_path(f"{key}.subject_path", capture.subject_path)
    for claim, path in capture.claims_paths.items():
        _check_path(f"{key}.claims_paths.{claim}", path)


def _check_private_key(where: str, client: ClientAuthSettings) -> None:
    assert client.private_key is not None  # the schema requires it for private_key_jwt
    try:
        key = load_pem_private_key(client.private_key.get_secret_value().encode(), password=None)
    except (ValueError, TypeError):
        # SECURITY: the text of the parser's error could quote the key; say only what is wrong.
        raise ConfigError(f"{where}.private_key: not an unencrypted PEM private key") from None
    fits = isinstance(key, _KEY_TYPES[client.private_key_alg])
    if isinstance(key, ec.EllipticCurvePrivateKey):
        fits = fits and isinstance(key.curve, ec.SECP256R1)  # ES256 is P-256 only
    if not fits:
        raise ConfigError(
            f"{where}.private_key: the key does not fit private_key_alg {client.private_key_alg}"
        )

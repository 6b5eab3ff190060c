"""The configuration: one YAML file, overridden by ``TOKENGATE_*`` environment variables.

This is the only module that reads files or the environment. Everything it returns is
frozen; values derived from several keys (the refresh lock's TTL) are computed here once.
Components receive the section they need, never the root object.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

AuthMode = Literal["none", "bearer", "session", "session_or_bearer"]
ClientAuth = Literal["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]

_REDIS_SCHEMES = frozenset(
    {
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
        "rediss+sentinel",
        "redis+cluster",
        "rediss+cluster",
    }
)
# A query parameter of a Redis URL whose value is a secret (redis-py's `password`, a
# Sentinel's `sentinel_password`, a key file's `ssl_password`).
_URL_SECRET_PARAM = re.compile(r"(^|&)([^=&]*password=)[^&]*")
OIDC_PROVIDER = "oidc"  # the provider the oidc section makes
_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.1: a token
_ASYMMETRIC_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _one_or_many(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


# A list of strings that may be written as one string (`audience: https://api`).
OneOrMany = Annotated[tuple[str, ...], BeforeValidator(_one_or_many)]


class ConfigError(Exception):
    """A configuration that cannot start; the message names the offending key."""


def is_loopback_host(host: str | None) -> bool:
    if host in (None, ""):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def parse_http_url(value: str, *, allow_http: bool = True) -> str:
    """Return ``value`` without a trailing slash if it is an absolute http(s) URL."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    # SECURITY: tokens travel to these URLs; plain http is only for loopback development.
    if parts.scheme == "http" and not (allow_http or is_loopback_host(parts.hostname)):
        raise ValueError("must use https:// (plain http is allowed for loopback hosts only)")
    return value.rstrip("/")


def mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":**********@", 1)
    query = _URL_SECRET_PARAM.sub(r"\1\2**********", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class Section(BaseModel):
    """Base of every section: frozen, unknown keys rejected, ``<secret>_file`` resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        # Kubernetes mounts secrets as files: `client_secret_file: /var/run/secrets/x`.
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            file_key = f"{name}_file"
            if field.annotation not in (SecretStr, SecretStr | None) or file_key not in data:
                continue
            path = data.pop(file_key)
            if path is None:
                continue
            try:
                data[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{file_key}: cannot read {path}: {exc.strerror}") from None
        return data


class ListenSettings(Section):
    host: str = "0.0.0.0"  # noqa: S104 - a proxy listens on all interfaces by design
    port: int = Field(8080, ge=0, le=65535)


class AdminSettings(Section):
    host: str = "0.0.0.0"  # noqa: S104
    port: int = Field(9090, ge=0, le=65535)


class LimitsSettings(Section):
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # one header line, name and value
    max_headers_total_bytes: int = Field(64 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)
    shutdown_delay_s: float = Field(5.0, ge=0)  # not-ready before we stop accepting
    shutdown_grace_s: float = Field(20.0, ge=0)  # in-flight requests may finish within this
    # SECURITY: slow clients (slowloris, slow POST, slow read). nginx's defaults and names:
    # a whole head within this, from the connection's start or the next head's first byte;
    client_header_timeout_s: float = Field(60.0, gt=0)
    # idle between requests; above the load balancer's own idle timeout (ALB's is 60 s);
    keepalive_timeout_s: float = Field(75.0, gt=0)
    # a request body with no byte for this long is 408 (abort once a response has started);
    client_body_timeout_s: float = Field(60.0, gt=0)
    # a write to a client that makes no progress for this long aborts the connection;
    send_timeout_s: float = Field(60.0, gt=0)
    # open client connections per worker on the public port; more are closed on arrival.
    max_connections: int = Field(4096, ge=1)


class ClientAuthSettings(Section):
    """How tokengate authenticates as an OAuth 2.0 client (token, revocation, introspection)."""

    client_id: str = ""
    client_secret: SecretStr | None = None
    client_auth: ClientAuth | None = None  # default: client_secret_basic with a secret, else none
    private_key: SecretStr | None = None  # PEM, for private_key_jwt (usually private_key_file)
    private_key_id: str | None = None
    private_key_alg: Literal["RS256", "PS256", "ES256", "EdDSA"] = "RS256"

    @model_validator(mode="after")
    def _check_client_auth(self) -> Self:
        method = self.effective_client_auth
        if method in ("client_secret_basic", "client_secret_post") and self.client_secret is None:
            raise ValueError(f"client_auth {method} needs client_secret (or client_secret_file)")
        if method == "private_key_jwt" and self.private_key is None:
            raise ValueError("client_auth private_key_jwt needs private_key_file")
        return self

    @property
    def effective_client_auth(self) -> ClientAuth:
        if self.client_auth is not None:
            return self.client_auth
        return "client_secret_basic" if self.client_secret is not None else "none"


class IssuerSettings(Section):
    """What it takes to trust one issuer's JWTs: where its keys are, and the rules."""

    issuer: str | None = None
    discovery_url: str | None = None  # default: {issuer}/.well-known/openid-configuration
    jwks_uri: str | None = None  # set to skip discovery for bearer-only deployments
    audience: OneOrMany = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")
    leeway_s: float = Field(30.0, ge=0, le=300)
    timeout_s: float = Field(5.0, gt=0, le=60)
    jwks_refetch_interval_s: float = Field(30.0, ge=0)  # unknown kid: at most one fetch per this
    jwks_max_age_s: float = Field(3600.0, gt=0)  # periodic refresh when no Cache-Control says
    token_cache_size: int = Field(1024, ge=0)  # verified tokens kept (about 2.5 KB each)
    # Access tokens must say they are (typ at+jwt, RFC 9068 §2.1); off: no typ or JWT pass too.
    require_at_jwt: bool = False
    # TLS trust for this issuer's endpoints (PEM bundle; default: the system's), and a
    # Bearer token file sent with discovery and JWKS requests, re-read on each fetch (a
    # Kubernetes API server's /openid/v1/jwks, with the pod's projected token).
    ca_file: str | None = None
    fetch_token_file: str | None = None

    @field_validator("issuer", "discovery_url", "jwks_uri")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else parse_http_url(value, allow_http=False)

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_asymmetric_algorithms(value)

    @field_validator("ca_file", "fetch_token_file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @property
    def effective_discovery_url(self) -> str | None:
        if self.discovery_url:
            return self.discovery_url
        if self.issuer:
            return f"{self.issuer}/.well-known/openid-configuration"
        return None


def check_asymmetric_algorithms(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("must list at least one algorithm")
    for alg in value:
        if alg.lower() == "none":
            raise ValueError("'none' is never accepted")
        if alg.upper().startswith("HS"):
            # SECURITY: keys come from the issuer's public JWKS; an HS* allowlist would
            # let a public key be used as an HMAC secret (algorithm confusion).
            raise ValueError(f"{alg} (HMAC) cannot be used with an issuer's public keys")
        if alg not in _ASYMMETRIC_ALGS:
            raise ValueError(f"unknown algorithm {alg!r}")
    return value


class IntrospectionSettings(ClientAuthSettings):
    """RFC 7662 at one provider: the endpoint, our client credentials, and the cache."""

    endpoint: str | None = None  # default: discovery's introspection_endpoint
    # An active answer is kept until the token's exp, at most this long; an inactive one
    # this long (a revoked token is seen within it).
    cache_ttl_s: float = Field(60.0, ge=0, le=3600)
    negative_cache_ttl_s: float = Field(5.0, ge=0, le=300)
    cache_size: int = Field(10000, ge=0)  # tokens kept per process (by digest)
    shared_cache: bool = False  # also in Redis (session.redis_url), keyed by the digest
    # The endpoint unavailable: serve an active answer this long past its cache TTL (never
    # past the token's exp); 0: fail closed at once (503 introspection_unavailable).
    stale_if_error_s: float = Field(0.0, ge=0, le=3600)

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else parse_http_url(value, allow_http=False)

    @model_validator(mode="after")
    def _check_client(self) -> IntrospectionSettings:
        # RFC 7662 §2.1: the endpoint must know who asks.
        if not self.client_id or self.effective_client_auth == "none":
            raise ValueError("introspection needs client_id and a client authentication")
        return self


class OidcSettings(IssuerSettings, ClientAuthSettings):
    """The login's OpenID Provider; its tokens are also the first trusted provider's."""

    # As a provider's (``ProviderSettings``): how its access tokens are checked.
    validation: Literal["jwt", "introspection"] = "jwt"
    introspection: IntrospectionSettings | None = None

    post_logout_redirect_uri: str | None = None  # default: {public_url}/
    scopes: tuple[str, ...] = ("openid", "profile", "email", "offline_access")
    # Login (authorization request) tuning.
    prompt: str | None = None
    consent_for_offline_access: bool = False  # send prompt=consent with offline_access
    acr_values: str | None = None
    extra_auth_params: dict[str, str] = Field(default_factory=dict)
    claims_in_session: tuple[str, ...] = ("sub", "name", "email", "preferred_username")

    @field_validator("post_logout_redirect_uri")
    @classmethod
    def _check_logout_url(cls, value: str | None) -> str | None:
        return None if value is None else parse_http_url(value, allow_http=False)


class ProviderSettings(IssuerSettings):
    """One trusted issuer of access tokens, picked by a token's ``iss``."""

    name: str
    validation: Literal["jwt", "introspection"] = "jwt"
    introspection: IntrospectionSettings | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _ROUTE_NAME.match(value):
            raise ValueError("name must be lowercase letters, digits, '_' or '-'")
        return value

    @model_validator(mode="after")
    def _check_provider(self) -> ProviderSettings:
        if self.validation == "introspection" and self.introspection is None:
            raise ValueError("validation introspection needs an introspection section")
        return self


class DpopSettings(Section):
    """DPoP proofs at ingress (RFC 9449 §4.3, §7), for every route that takes tokens."""

    algorithms: tuple[str, ...] = ("ES256", "ES384", "EdDSA", "PS256", "RS256")
    max_age_s: float = Field(60.0, gt=0, le=600)  # a proof's iat may be this old
    leeway_s: float = Field(5.0, ge=0, le=60)  # and this far ahead of our clock
    # Proofs seen (jti) within max_age_s + leeway_s: in Redis (session.redis_url), shared by
    # every replica, or in this process. Default: redis when sessions use Redis, else memory.
    replay_store: Literal["redis", "memory"] | None = None
    nonce: bool = False  # require server nonces (§8); DPoP-Nonce is sent with every 401
    nonce_secret: SecretStr | None = None  # every replica the same; needed with nonce
    nonce_lifetime_s: float = Field(300.0, ge=10, le=3600)
    # What the upstream receives: the request as the client sent it (Authorization: DPoP and
    # the DPoP header), or Authorization: Bearer and the verified key's thumbprint.
    upstream: Literal["as_received", "bearer"] = "as_received"
    thumbprint_header: str = "X-DPoP-Thumbprint"

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_asymmetric_algorithms(value)

    @model_validator(mode="after")
    def _check_nonce(self) -> DpopSettings:
        if self.nonce and self.nonce_secret is None:
            raise ValueError("nonce needs nonce_secret (or nonce_secret_file)")
        if self.nonce_secret is not None and len(self.nonce_secret.get_secret_value()) < 32:
            raise ValueError("nonce_secret must be at least 32 characters")
        return self


class JsonResponsePaths(Section):
    """Dotted paths into a custom token API's JSON reply (``data.accessToken``)."""

    access_token: str = "access_token"  # noqa: S105 - a JSON path, not a secret
    refresh_token: str | None = "refresh_token"  # noqa: S105 - a JSON path
    expires_in: str | None = "expires_in"
    token_type: str | None = None
    success: str | None = None  # e.g. isSuccess; absent = HTTP 2xx means success
    success_value: Any = True


class JsonCallSettings(Section):
    """One call to a custom JSON token API (refresh, or logout/revoke)."""

    url: str
    method: Literal["POST", "PUT", "GET"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)  # static, e.g. {"Version": "2.0"}
    send_access_token: bool = False  # the current access token as Authorization: Bearer
    # Placeholders: {refresh_token} {access_token} {client_id} {scope}
    body: dict[str, Any] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return parse_http_url(value, allow_http=False)


class JsonDialectSettings(JsonCallSettings):
    response: JsonResponsePaths = JsonResponsePaths()
    # Which replies mean "the refresh token is dead" (end the session); anything else that
    # is not a success is transient (keep serving while the access token lasts).
    dead_token_statuses: tuple[int, ...] = (400, 401, 403)
    dead_token_path: str | None = None  # e.g. errorCode
    dead_token_values: tuple[Any, ...] = ()  # values at dead_token_path that mean dead
    logout: JsonCallSettings | None = None  # called on logout, e.g. /User/Logout


class CaptureSettings(Section):
    """Token capture: a login that is an API call; its reply's tokens become a session."""

    response: JsonResponsePaths = JsonResponsePaths()
    subject_path: str | None = None  # default: the access token's `sub`, else "unknown"
    claims_paths: dict[str, str] = Field(default_factory=dict)  # claim name -> reply path


class RefreshSettings(Section):
    ahead_s: float = Field(60.0, ge=0)
    dialect: Literal["oauth2", "json"] = "oauth2"
    json_api: JsonDialectSettings | None = Field(None, alias="json")
    timeout_s: float = Field(10.0, gt=0, le=120)  # one IdP refresh call, enforced
    lock_wait_s: float | None = Field(None, gt=0)  # default: the lock's TTL, plus 1 s
    retry_after_s: int = Field(5, ge=1)
    default_lifetime_s: float = Field(300.0, gt=0)  # opaque token and no expires_in
    token_endpoint: str | None = None  # default: from discovery
    scope: tuple[str, ...] = ()  # ask for a narrower scope on refresh (RFC 6749 §6)
    # An upstream 401 to an access token younger than this (obtained by a refresh) is
    # relayed without refreshing again: an upstream that rejects every token must not turn
    # each request into a refresh grant at the IdP.
    forced_min_interval_s: float = Field(30.0, ge=0)
    # After a refresh failed for a reason of the IdP's (down, slow, 5xx), no replica tries
    # that session again for backoff_first_s, doubling per consecutive failure up to
    # backoff_max_s, each interval jittered down to no less than half (sessions.backoff).
    backoff_first_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)

    @field_validator("token_endpoint")
    @classmethod
    def _check_token_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else parse_http_url(value, allow_http=False)

    @model_validator(mode="after")
    def _check_dialect(self) -> RefreshSettings:
        if self.dialect == "json" and self.json_api is None:
            raise ValueError("refresh.dialect json needs the refresh.json section")
        if self.backoff_first_s > self.backoff_max_s:
            raise ValueError("refresh.backoff_first_s must be <= backoff_max_s")
        return self

    @property
    def lock_ttl_s(self) -> float:
        # The lock must outlive the IdP call plus the write of its result, or a second
        # replica could refresh with a refresh token the first is about to rotate.
        return self.timeout_s * 2 + 2.0

    @property
    def effective_lock_wait_s(self) -> float:
        # Waiters outlast a holder that died with the lock (SIGKILL): its TTL frees it.
        return self.lock_wait_s if self.lock_wait_s is not None else self.lock_ttl_s + 1.0


class SessionSettings(Section):
    store: Literal["redis", "memory"] = "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(2.0, gt=0)
    key_prefix: str = "tg"
    cookie_name: str = "__Host-tokengate"
    cookie_secure: bool = True
    cookie_samesite: Literal["Lax", "Strict"] = "Lax"
    idle_timeout_s: int = Field(1800, ge=60)
    absolute_timeout_s: int = Field(86400, ge=60)
    login_timeout_s: int = Field(600, ge=30)
    # Each process keeps a session it loaded this long (0: off), dropped at once when any
    # replica writes or ends it (Redis pub/sub); a request then needs no Redis round trip,
    # which costs the process ~120-180 µs of CPU in redis-py (more than the whole proxied
    # request). Pub/sub carries correctness; this age bounds only what bypasses tokengate
    # (a key deleted by hand, evicted) and the precision of the idle timeout. 5 s cost the
    # bench's session target ~10 points of throughput against 30 s (bench/README.md).
    local_cache_s: float = Field(30.0, ge=0, le=60)
    local_cache_size: int = Field(4096, ge=1)  # sessions (~3 KB each)
    # After taking a refresh lock and after writing a refreshed session, wait (Redis WAIT)
    # until this many replicas have the write, for up to wait_timeout_s; 0: do not wait.
    # With Sentinel or Cluster, 1 keeps a failover from losing the lock or the rotated
    # refresh token (replication is asynchronous) at the cost of a replica round trip per
    # lock and per refresh; fewer acknowledgements are counted, and the refresh goes on.
    wait_replicas: int = Field(0, ge=0)
    wait_timeout_s: float = Field(0.2, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in _REDIS_SCHEMES:
            raise ValueError(
                "must be a redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
                "redis+cluster:// or rediss+cluster:// URL"
            )
        return value

    @property
    def login_cookie_name(self) -> str:
        """The short-lived cookie binding a pending login to the browser that started it."""
        return self.cookie_name + "-login"

    @model_validator(mode="after")
    def _check_cookie(self) -> SessionSettings:
        if self.cookie_name.startswith("__Host-") and not self.cookie_secure:
            raise ValueError("a __Host- cookie must be Secure; rename it to turn Secure off")
        if self.absolute_timeout_s < self.idle_timeout_s:
            raise ValueError("absolute_timeout_s must be >= idle_timeout_s")
        # The idle timeout slides on reads from Redis; a copy kept as long as the idle
        # timeout would let an active session's key expire under it.
        if self.local_cache_s >= self.idle_timeout_s:
            raise ValueError("local_cache_s must be < idle_timeout_s")
        # WAIT blocks its connection: it must end before the command timeout cuts it.
        if self.wait_timeout_s >= self.redis_timeout_s:
            raise ValueError("wait_timeout_s must be < redis_timeout_s")
        return self


class CsrfSettings(Section):
    header: str = "X-CSRF"


class TracingSettings(Section):
    """W3C trace context (always) and OpenTelemetry spans (with an exporter)."""

    # none: propagation only (no SDK); otlp_http / otlp_grpc: spans exported over OTLP,
    # with the `otel` extra installed (pip install tokengate[otel]).
    exporter: Literal["none", "otlp_http", "otlp_grpc"] = "none"
    # Default: the SDK's (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT,
    # else http://localhost:4318/v1/traces or localhost:4317).
    endpoint: str | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)  # e.g. a collector's API key
    sample_ratio: float = Field(1.0, ge=0, le=1)  # of new traces; a caller's decision stands
    service_name: str = "tokengate"  # OTEL_SERVICE_NAME wins, as the SDK reads it
    export_interval_ms: int = Field(5000, ge=10, le=60000)  # the batch's schedule delay
    # Trace context at all: continue a caller's traceparent, send ours upstream, log the
    # ids. False without an exporter: none of it (tracing off); with one: new traces only.
    propagate: bool = True


class RouteSettings(Section):
    prefix: str
    upstream: str
    name: str | None = None  # metric label; default derived from the prefix
    auth: AuthMode = "bearer"
    scopes: tuple[str, ...] = ()
    strip_prefix: bool = False
    read_timeout_s: float = Field(
        30.0, gt=0
    )  # upstream silent this long (to headers, between chunks)
    connect_timeout_s: float = Field(5.0, gt=0)
    websocket: bool = False
    identity_headers: dict[str, str] = Field(default_factory=dict)  # header -> claim
    max_body_bytes: int | None = Field(None, ge=0)
    capture_tokens: CaptureSettings | None = None  # a login API whose reply starts a session
    # After an upstream 401 and a refreshed token, requests are replayed only when their
    # method is idempotent (RFC 9110 §9.2.2); true replays POST and PATCH too.
    replay_non_idempotent_after_refresh: bool = False
    # Bearer tokens: the providers whose tokens this route takes (names; default: all), a
    # DPoP proof required (RFC 9449; no plain Bearer token then), and JWTs introspected too
    # (revocation-sensitive routes; their provider needs an introspection section).
    providers: tuple[str, ...] = ()
    require_dpop: bool = False
    introspect_jwts: bool = False

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if (
            not value.startswith("/")
            or "//" in value
            or "\\" in value
            or "%" in value
            or ";" in value  # routes match on segment names, before any ';' (routing)
        ):
            raise ValueError("must be an absolute, plain path such as /api/")
        if any(seg in (".", "..") for seg in value.split("/")):
            raise ValueError("must not contain dot segments")
        return value if value == "/" else value.rstrip("/")

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str) -> str:
        return parse_http_url(value)

    @field_validator("identity_headers")
    @classmethod
    def _check_identity_headers(cls, value: dict[str, str]) -> dict[str, str]:
        # SECURITY: a name is sent upstream as written; a space, a colon or a line break in
        # it would make another header of it, or of the value after it (RFC 9110 §5.1).
        for name in value:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name (RFC 9110 token characters)")
        return value

    @model_validator(mode="after")
    def _default_name(self) -> RouteSettings:
        if self.name is None:
            derived = re.sub(r"[^a-z0-9]+", "_", self.prefix.lower()).strip("_") or "root"
            object.__setattr__(self, "name", derived[:63])
        elif not _ROUTE_NAME.match(self.name):
            raise ValueError("name must be lowercase letters, digits, '_' or '-'")
        return self


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    access_log: bool = True
    log_query_string: bool = False
    log_subject: bool = False  # default: a hash of the subject, not the subject


class UpstreamClientSettings(Section):
    # http1: our llhttp keep-alive pool for http:// upstreams (https:// and WebSockets always
    # use aiohttp's client); aiohttp: aiohttp's client for everything, the fallback.
    client: Literal["http1", "aiohttp"] = "http1"
    pool_size: int = Field(1024, ge=1)  # connections per upstream host (per worker)
    # Below the upstream's own keep-alive timeout, or a reused connection can meet its close
    # (Node's default is 5 s, nginx's 75 s, Go's none). A replayable request is retried once.
    idle_timeout_s: float = Field(4.0, gt=0)


class ForwardedSettings(Section):
    """Which TCP peers may tell us about the client: the proxies in front of tokengate."""

    # SECURITY: addresses or CIDR networks (a load balancer's subnet), as nginx's
    # set_real_ip_from. From such a peer the forwarding headers (Forwarded, X-Real-IP,
    # X-Forwarded-*) are passed on and the peer appended to X-Forwarded-For; from any other
    # peer they are removed and ours set. Identity headers are never taken from anyone.
    trusted_proxies: OneOrMany = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        networks = []
        for item in value:
            try:
                # Canonical form (10.1.2.3/8 is 10.0.0.0/8), so check-config shows what is
                # trusted.
                networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return tuple(networks)

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(network) for network in self.trusted_proxies)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: ListenSettings = ListenSettings()
    admin: AdminSettings = AdminSettings()
    public_url: str = "http://localhost:8080"
    workers: int = Field(1, ge=1, le=64)
    limits: LimitsSettings = LimitsSettings()
    upstream: UpstreamClientSettings = UpstreamClientSettings()
    forwarded: ForwardedSettings = ForwardedSettings()
    oidc: OidcSettings = OidcSettings()
    providers: tuple[ProviderSettings, ...] = ()  # trusted besides oidc's issuer
    dpop: DpopSettings = DpopSettings()
    refresh: RefreshSettings = RefreshSettings()
    session: SessionSettings = SessionSettings()
    csrf: CsrfSettings = CsrfSettings()
    log: LogSettings = LogSettings()
    tracing: TracingSettings = TracingSettings()
    routes: tuple[RouteSettings, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment overrides it, key by key.
        return (env_settings, init_settings)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        return parse_http_url(value, allow_http=False)

    @model_validator(mode="after")
    def _check_routes(self) -> Settings:
        seen_prefix: dict[str, int] = {}
        seen_name: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            if route.prefix in seen_prefix:
                raise ValueError(
                    f"routes.{index}.prefix: {route.prefix!r} duplicates "
                    f"routes.{seen_prefix[route.prefix]}.prefix"
                )
            assert route.name is not None
            if route.name in seen_name:
                raise ValueError(f"routes.{index}.name: {route.name!r} is used twice")
            if route.prefix.startswith("/auth") and (
                route.prefix == "/auth" or route.prefix.startswith("/auth/")
            ):
                raise ValueError(f"routes.{index}.prefix: /auth/ is reserved for tokengate")
            seen_prefix[route.prefix] = index
            seen_name[route.name] = index
            self._check_route_providers(index, route)
        if not self.session.cookie_secure and not (
            self.public_url.startswith("http://")
            and is_loopback_host(urlsplit(self.public_url).hostname)
        ):
            # SECURITY: a session cookie without Secure is for http://localhost development only.
            raise ValueError(
                "session.cookie_secure: false is allowed only for an http loopback public_url"
            )
        if self.listen.port == self.admin.port and self.listen.port != 0:
            raise ValueError("admin.port: must differ from listen.port")
        self._check_providers()
        captures = any(r.capture_tokens is not None for r in self.routes)
        if self.uses_sessions and not (self.uses_oidc_login or captures):
            raise ValueError(
                "session routes need oidc.issuer and oidc.client_id, or a capture_tokens route"
            )
        if self.workers > 1 and self.session.store == "memory" and self.uses_sessions:
            raise ValueError("session.store: memory cannot be shared by workers > 1")
        return self

    def _check_providers(self) -> None:
        names: set[str] = set()
        issuers: set[str] = set()
        for index, provider in enumerate(self.token_providers):
            from_oidc = not index and bool(self.oidc.issuer or self.oidc.jwks_uri)
            where = (
                "oidc"
                if from_oidc
                else f"providers.{index - 1 if self.oidc.issuer or self.oidc.jwks_uri else index}"
            )
            if provider.name in names:
                raise ValueError(f"providers: the name {provider.name!r} is used twice")
            names.add(provider.name)
            if provider.issuer is None:
                if len(self.token_providers) > 1 or where == "providers":
                    # A token's provider is picked by its iss: each one needs its own.
                    raise ValueError(f"{where}.issuer: required when several providers are trusted")
            elif provider.issuer in issuers:
                raise ValueError(f"{where}: issuer {provider.issuer} is trusted twice")
            else:
                issuers.add(provider.issuer)
            accepted = any(
                r.auth in ("bearer", "session_or_bearer")
                and (not r.providers or provider.name in r.providers)
                for r in self.routes
            )
            if accepted and not provider.audience:
                # SECURITY: without an audience, any token of the issuer (for any API) would do.
                raise ValueError(f"{where}.audience: required when a route accepts its tokens")
        if self.dpop.replay_store == "redis" and self.session.store != "redis":
            raise ValueError("dpop.replay_store: redis needs session.store: redis")
        shared = [
            p.name for p in self.token_providers if p.introspection and p.introspection.shared_cache
        ]
        if shared and self.session.store != "redis":
            raise ValueError("introspection.shared_cache needs session.store: redis")

    def _check_route_providers(self, index: int, route: RouteSettings) -> None:
        # `session` alone may do without: capture routes make sessions (checked below).
        if route.auth not in ("bearer", "session_or_bearer"):
            if route.providers or route.require_dpop or route.introspect_jwts:
                raise ValueError(f"routes.{index}: providers, dpop and introspection need Bearer")
            return
        known = {p.name: p for p in self.token_providers}
        if not known:
            raise ValueError(f"routes.{index}.auth: {route.auth} needs oidc.issuer or providers")
        unknown = [name for name in route.providers if name not in known]
        if unknown:
            raise ValueError(f"routes.{index}.providers: no provider named {unknown[0]!r}")
        accepted = [known[name] for name in route.providers] or list(known.values())
        opaque = [p.name for p in accepted if p.validation == "introspection"]
        if len(opaque) > 1:
            # An opaque token names no issuer: only one provider can be asked about it.
            raise ValueError(f"routes.{index}.providers: more than one introspection provider")
        if route.introspect_jwts:
            lacking = [p.name for p in accepted if p.introspection is None]
            if lacking:
                raise ValueError(
                    f"routes.{index}.introspect_jwts: provider {lacking[0]!r} has no introspection"
                )

    @property
    def token_providers(self) -> tuple[ProviderSettings, ...]:
        """Every trusted issuer of access tokens: oidc's first (named ``oidc``), then
        ``providers``. A provider is picked by a token's ``iss`` (``tokens.providers``)."""
        listed = self.providers
        if not (self.oidc.issuer or self.oidc.jwks_uri):
            return listed
        fields = (*IssuerSettings.model_fields.keys(), "validation", "introspection")
        oidc = ProviderSettings(
            name=OIDC_PROVIDER, **{name: getattr(self.oidc, name) for name in fields}
        )
        return (oidc, *listed)

    @property
    def dpop_replay_store(self) -> Literal["redis", "memory"]:
        """Where DPoP proofs seen are kept: as configured, else with the sessions' Redis
        when sessions use one, else in memory (one process's view)."""
        if self.dpop.replay_store is not None:
            return self.dpop.replay_store
        return "redis" if self.session.store == "redis" and self.uses_sessions else "memory"

    @property
    def shares_token_state(self) -> bool:
        """Whether DPoP's replay cache or an introspection cache lives in Redis (shared by
        replicas), so the token checks need a Redis client of their own."""
        providers = self.token_providers
        return bool(providers) and (
            self.dpop_replay_store == "redis"
            or any(p.introspection and p.introspection.shared_cache for p in providers)
        )

    @property
    def uses_sessions(self) -> bool:
        return any(
            r.auth in ("session", "session_or_bearer") or r.capture_tokens is not None
            for r in self.routes
        )

    @property
    def uses_oidc_login(self) -> bool:
        """Browser login by OIDC redirect (else sessions only come from token capture)."""
        return bool(self.oidc.issuer and self.oidc.client_id)

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/auth/callback"


def parse_settings(data: Mapping[str, Any]) -> Settings:
    """Validate a configuration mapping (plus the environment) into frozen settings."""
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except SettingsError as exc:
        # An environment value that is not JSON where a list or mapping is expected.
        raise ConfigError(f"invalid configuration: {exc}") from None


def load_settings(path: str | os.PathLike[str] | None) -> Settings:
    """Read the YAML file at ``path`` (or nothing) and apply the environment on top."""
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return parse_settings(data)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}: {message}" if key else message)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def dump_settings(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, every secret masked."""
    data = settings.model_dump(mode="json", by_alias=True)  # SecretStr dumps as '**********'
    data["session"]["redis_url"] = mask_url_password(settings.session.redis_url)
    # The providers tokens are judged by, oidc's included: what routes' `providers` name.
    data["token_providers"] = [p.model_dump(mode="json") for p in settings.token_providers]
    return data

"""Every error a client can see, as one exception tree; ``ingress`` renders them.

Raise anywhere, render in one place. Each class carries its HTTP status, the JSON ``error``
code (the README's error table; the tree is drawn in docs/architecture.md too) and any
headers it needs. Foreign exceptions are translated where they enter (``upstream``, the
session stores, ``idp``), and their text never reaches a client.

    GatewayError
    ├── BadRequestError                      400 invalid_request
    │   └── LoginStateError                  400 invalid_login_state
    ├── InvalidTokenError                    401 invalid_token   (WWW-Authenticate, RFC 6750)
    │   ├── InvalidDpopProofError            401 invalid_dpop_proof (WWW-Authenticate: DPoP)
    │   └── UseDpopNonceError                401 use_dpop_nonce  (DPoP-Nonce, RFC 9449 §9)
    ├── AuthenticationRequiredError          401 unauthenticated
    │   └── SessionExpiredError              401 session_expired (login_url)
    ├── InsufficientScopeError               403 insufficient_scope
    ├── CsrfError                            403 csrf
    ├── NotFoundError                        404 not_found
    ├── MethodNotAllowedError                405 method_not_allowed
    ├── RequestTimeoutError                  408 request_timeout     (Connection: close)
    ├── PayloadTooLargeError                 413 payload_too_large
    ├── URITooLongError                      414 uri_too_long
    ├── ExpectationFailedError               417 expectation_failed
    ├── HeadersTooLargeError                 431 request_header_fields_too_large
    ├── IdpError                             502 idp_error
    ├── UpstreamUnavailableError             502 upstream_unavailable
    ├── SessionStoreUnavailableError         503 session_store_unavailable (Retry-After)
    ├── RefreshUnavailableError              503 refresh_unavailable (Retry-After)
    ├── IntrospectionUnavailableError        503 introspection_unavailable (Retry-After)
    └── UpstreamTimeoutError                 504 upstream_timeout
"""

from __future__ import annotations

from typing import Any, ClassVar


def _quote(value: str) -> str:
    # RFC 6750 §3: auth-param values are quoted-strings; keep them to a safe subset.
    return "".join(ch for ch in value if ch.isprintable() and ch not in '"\\')


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_description: ClassVar[str] = "internal error"

    def __init__(self, description: str | None = None) -> None:
        self.description = description or self.default_description
        super().__init__(self.description)

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


class BadRequestError(GatewayError):
    status = 400
    code = "invalid_request"
    default_description = "the request is malformed"


class LoginStateError(BadRequestError):
    code = "invalid_login_state"
    default_description = "the login state is missing, expired or already used; log in again"


class InvalidTokenError(GatewayError):
    status = 401
    code = "invalid_token"
    default_description = "the access token is invalid"

    def __init__(self, description: str | None = None, *, result: str = "invalid") -> None:
        super().__init__(description)
        self.result = result  # a bounded metric label: expired, bad_signature, ...
        # Set by ``auth`` when the token came with the DPoP scheme: the challenge is then
        # DPoP's, with the algorithms we take (RFC 9449 §7.1).
        self.dpop_algs: tuple[str, ...] | None = None
        self.dpop_nonce: str | None = None

    def headers(self) -> dict[str, str]:
        description = _quote(self.description)
        if self.dpop_algs is None:
            challenge = f'Bearer error="{self.code}", error_description="{description}"'
            return {"WWW-Authenticate": challenge}
        algs = _quote(" ".join(self.dpop_algs))
        headers = {
            "WWW-Authenticate": (
                f'DPoP error="{self.code}", error_description="{description}", algs="{algs}"'
            )
        }
        if self.dpop_nonce is not None:
            headers["DPoP-Nonce"] = self.dpop_nonce
        return headers


class InvalidDpopProofError(InvalidTokenError):
    """The DPoP proof (RFC 9449 §4.3) is missing, malformed, replayed or does not fit."""

    code = "invalid_dpop_proof"
    default_description = "the DPoP proof is invalid"


class UseDpopNonceError(InvalidTokenError):
    """The proof lacks the server nonce we require, or carries a stale one (§8, §9)."""

    code = "use_dpop_nonce"
    default_description = "the DPoP proof must carry the nonce in DPoP-Nonce"


class AuthenticationRequiredError(GatewayError):
    """No credentials at all: RFC 6750 §3.1 says no error code in the challenge."""

    status = 401
    code = "unauthenticated"
    default_description = "authentication required"

    def __init__(
        self,
        description: str | None = None,
        *,
        login_url: str | None = None,
        set_cookie: str | None = None,
    ) -> None:
        super().__init__(description)
        self.login_url = login_url
        self.set_cookie = set_cookie  # e.g. the deletion of a dead session cookie
        # Set by ``auth`` where DPoP is taken: its challenge too, or alone where required.
        self.dpop_algs: tuple[str, ...] | None = None
        self.bearer = True

    def headers(self) -> dict[str, str]:
        challenges = ["Bearer"] if self.bearer else []
        if self.dpop_algs is not None:
            challenges.append(f'DPoP algs="{_quote(" ".join(self.dpop_algs))}"')
        headers = {"WWW-Authenticate": ", ".join(challenges)}
        if self.set_cookie:
            headers["Set-Cookie"] = self.set_cookie
        return headers

    def body(self) -> dict[str, Any]:
        body = super().body()
        if self.login_url:
            body["login_url"] = self.login_url
        return body


class SessionExpiredError(AuthenticationRequiredError):
    code = "session_expired"
    default_description = "the session has ended; log in again"


class InsufficientScopeError(GatewayError):
    status = 403
    code = "insufficient_scope"
    default_description = "the access token lacks a required scope"

    def __init__(self, required: tuple[str, ...]) -> None:
        super().__init__(f"requires scope: {' '.join(required)}")
        self.required = required

    def headers(self) -> dict[str, str]:
        scope = _quote(" ".join(self.required))
        return {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'}


class CsrfError(GatewayError):
    status = 403
    code = "csrf"
    default_description = "cookie-authenticated requests must send the CSRF header"


class NotFoundError(GatewayError):
    status = 404
    code = "not_found"
    default_description = "no route matches this path"


class MethodNotAllowedError(GatewayError):
    status = 405
    code = "method_not_allowed"
    default_description = "method not allowed"


class RequestTimeoutError(GatewayError):
    """The client did not send its request in time: a whole head within
    ``limits.client_header_timeout_s``, or a byte of its body within
    ``limits.client_body_timeout_s``. The connection is read no further: RFC 9110 §15.5.9
    asks for ``close``."""

    status = 408
    code = "request_timeout"
    default_description = "the request was not received in time"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class PayloadTooLargeError(GatewayError):
    status = 413
    code = "payload_too_large"
    default_description = "the request body is too large"


class ExpectationFailedError(GatewayError):
    status = 417
    code = "expectation_failed"
    default_description = "the only expectation supported is 100-continue"


class URITooLongError(GatewayError):
    status = 414
    code = "uri_too_long"
    default_description = "the request target is too long"


class HeadersTooLargeError(GatewayError):
    status = 431
    code = "request_header_fields_too_large"
    default_description = "the request headers are too large"


class IdpError(GatewayError):
    status = 502
    code = "idp_error"
    default_description = "the identity provider gave an unusable answer"


class UpstreamUnavailableError(GatewayError):
    status = 502
    code = "upstream_unavailable"
    default_description = "the upstream service is unavailable"


class SessionStoreUnavailableError(GatewayError):
    status = 503
    code = "session_store_unavailable"
    default_description = "the session store is unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class RefreshUnavailableError(GatewayError):
    status = 503
    code = "refresh_unavailable"
    default_description = "the identity provider is unavailable and the access token has expired"

    def __init__(self, retry_after_s: int = 5) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class IntrospectionUnavailableError(GatewayError):
    """The provider's introspection endpoint cannot say whether the token is active: fail
    closed (RFC 7662 gives no default; accepting would let a revoked token through)."""

    status = 503
    code = "introspection_unavailable"
    default_description = "the token could not be checked with its issuer; try again"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class UpstreamTimeoutError(GatewayError):
    status = 504
    code = "upstream_timeout"
    default_description = "the upstream service did not answer in time"

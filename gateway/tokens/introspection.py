"""OAuth 2.0 Token Introspection (RFC 7662) at one provider: ask, check the answer, cache it.

``Introspector.introspect`` answers the claims of an active token, checked with the same
rules and types as a JWT's (``jws.check_claims``), or raises: ``InvalidTokenError`` when
the provider says the token is inactive or its answer fails a check (401), or
``IntrospectionUnavailableError`` when the provider cannot say (503: the endpoint is down,
slow, answers other than 200, or garbles its answer). It fails closed: RFC 7662 gives no
default, and accepting would let a revoked token through. The one exception is an active
answer cached before, which ``stale_if_error_s`` may serve a while past its TTL (never
past the token's ``exp``).

Answers are cached by the SHA-256 of the token (never the token itself): active ones
until the token's ``exp``, at most ``cache_ttl_s``; inactive ones (and active ones that
failed a check) ``negative_cache_ttl_s``; at most ``cache_size`` per process, least
recently used out first. ``cache_ttl_s`` 0 turns every cache off (local, shared and
stale); ``cache_size`` 0 the local one. A ``TokenState`` shares answers between replicas
(namespace ``introspect:<provider>``, the digest as key, the claims as compact JSON or
``inactive``); it is read after the local cache, before the endpoint, and what it holds is
checked again as if the endpoint had just said it. It is an optimisation: when it does not
answer the endpoint is asked. A shared answer is not copied into the local cache: its
remaining TTL is unknown here, and a copy would keep an answer (a revoked token) longer
than ``cache_ttl_s``. One call per token digest at a time (``SingleFlight``): concurrent
requests with one token share one look-up.

What the caller does with the claims is not decided here: picking the provider, the scopes
a route requires, and the DPoP proof an answer with ``cnf.jkt`` demands are ``auth``'s
(``providers``). Descriptions of refusals may be shown to clients; none carries the token
or the reply. Logs carry the provider, a status or an error type: never the token, the
reply, or our client credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from opentelemetry.trace import SpanKind, Tracer

from gateway.errors import IntrospectionUnavailableError, InvalidTokenError
from gateway.idp.client_auth import ClientAuthentication
from gateway.idp.discovery import Discovery
from gateway.idp.json_paths import read_limited
from gateway.idp.tokens import IdpUnavailable, idp_call
from gateway.metrics import Metrics
from gateway.settings import IntrospectionSettings, ProviderSettings
from gateway.single_flight import SingleFlight
from gateway.tokens import jws
from gateway.tokens.shared import SharedStateUnavailable, TokenState
from gateway.tracing import NO_TRACER

log = logging.getLogger(__name__)

_INACTIVE = b"inactive"  # the shared cache's value for an inactive token
# An introspection answer is a few hundred bytes; a provider that sends more than this is
# not answering the question (and we do not buffer without bound).
MAX_REPLY_BYTES = 256 * 1024
# token_type values (RFC 7662 §2.2) that say the token is no access token: a refresh
# token presented as a bearer token must not pass because the endpoint knows it.
_NOT_ACCESS_TOKEN_TYPES = frozenset(
    {"refresh_token", "refresh", "urn:ietf:params:oauth:token-type:refresh_token"}
)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the provider said about one token, judged: the checked claims of an active
    token, or why it is refused (an ``InvalidTokenError``'s result and description)."""

    claims: dict[str, Any] | None
    refusal: tuple[str, str] | None
    exp: float | None  # the token's, for an active one that has it

    def result(self) -> dict[str, Any]:
        """The claims (a copy: the caller may add to it), or a fresh ``InvalidTokenError``
        (one per request: ``auth`` writes its DPoP challenge onto the exception)."""
        if self.claims is None:
            assert self.refusal is not None
            result, description = self.refusal
            raise InvalidTokenError(description, result=result)
        return dict(self.claims)


@dataclass(frozen=True, slots=True)
class _Entry:
    answer: _Answer
    fresh_until: float  # served as a hit before this
    usable_until: float  # served as stale, the endpoint unavailable, before this


_INACTIVE_ANSWER = _Answer(None, ("inactive", "the token is not active"), None)


def token_digest(token: str) -> str:
    """The key an answer is kept under: SHA-256 of the token, hex."""
    # surrogatepass: a header decoded with surrogateescape still has one digest.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Introspector:
    """One provider's introspection. Borrows ``http`` (the IdP ``ClientSession``) and
    ``shared``; owns its flights (``aclose``)."""

    def __init__(
        self,
        provider: ProviderSettings,
        discovery: Discovery | None,
        http: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        shared: TokenState | None = None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._tracer = tracer
        if provider.introspection is None:
            raise ValueError(f"provider {provider.name} has no introspection settings")
        settings: IntrospectionSettings = provider.introspection
        if settings.endpoint is None and discovery is None:
            raise ValueError(f"provider {provider.name}: no introspection endpoint nor discovery")
        self._provider = provider
        self._settings = settings
        self._discovery = discovery
        self._http = http
        self._metrics = metrics
        self._clock = clock
        self._client_auth = ClientAuthentication(settings)
        self._timeout = aiohttp.ClientTimeout(total=provider.timeout_s)
        caching = settings.cache_ttl_s > 0
        self._local = caching and settings.cache_size > 0
        self._shared = shared if caching else None
        self._namespace = f"introspect:{provider.name}"
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: SingleFlight[str, tuple[_Answer | None, str]] = SingleFlight(
            f"introspect:{provider.name}"
        )
        name = provider.name
        self._calls = {
            result: metrics.child(metrics.introspection_total, name, result)
            for result in ("active", "inactive", "error")
        }
        self._duration = metrics.child(metrics.introspection_duration_seconds, name)

    def _count_read(self, result: str) -> None:
        metrics = self._metrics
        metrics.add(metrics.introspection_cache_total, self._provider.name, result)

    @property
    def cached_answers(self) -> int:
        """Answers kept in this process (fresh, or kept to be served stale)."""
        return len(self._cache)

    async def introspect(self, token: str) -> dict[str, Any]:
        """The claims of an active token, checked; else ``InvalidTokenError`` (401) or
        ``IntrospectionUnavailableError`` (503)."""
        return (await self.introspect_until(token))[0]

    async def introspect_until(self, token: str) -> tuple[dict[str, Any], float]:
        """``introspect``'s claims, and until when this answer is served without asking
        again (0 when it is not kept): a caller may keep what it made of them that long."""
        if not token:
            raise jws.invalid("malformed", "the token is malformed")
        key = token_digest(token)
        entry = self._cache.get(key)
        if entry is not None:
            now = self._clock()
            if now < entry.fresh_until:
                self._cache.move_to_end(key)
                self._count_read("hit")
                return entry.answer.result(), entry.fresh_until
            # Past its TTL: kept only while it may still be served stale (the flight
            # looks for it when the endpoint fails).
            if now >= entry.usable_until:
                del self._cache[key]
        answer, source = await self._flights.join(key, lambda: self._look_up(key, token))
        self._count_read(source)
        if answer is None:
            raise IntrospectionUnavailableError()
        claims = answer.result()
        kept = self._cache.get(key)
        fresh = kept is not None and kept.answer is answer and source != "stale"
        return claims, kept.fresh_until if fresh and kept is not None else 0.0

    def count_hit(self) -> None:
        """An answer of ours served from a caller's keeping (``introspect_until``)."""
        self._count_read("hit")

    async def aclose(self) -> None:
        await self._flights.aclose()

    # -- one look-up per digest --------------------------------------------------------

    async def _look_up(self, key: str, token: str) -> tuple[_Answer | None, str]:
        """(the answer, where it came from: shared, miss, stale), or (None, miss) when
        nobody can say. Returns rather than raises: every waiter raises its own error."""
        if self._shared is not None:
            answer = await self._shared_answer(key)
            if answer is not None:
                self._cache.pop(key, None)  # a newer answer: no stale one to fall back on
                return answer, "shared"
        reply = await self._call(token)
        if reply is None:
            stale = self._stale(key)
            return (stale, "stale") if stale is not None else (None, "miss")
        answer = self._judge(reply)
        if answer is None:
            return None, "miss"
        await self._keep(key, answer)
        return answer, "miss"

    def _stale(self, key: str) -> _Answer | None:
        entry = self._cache.get(key)
        if entry is None or entry.answer.claims is None or self._clock() >= entry.usable_until:
            return None
        log.warning("introspection_stale_served", extra={"provider": self._provider.name})
        return entry.answer

    async def _shared_answer(self, key: str) -> _Answer | None:
        assert self._shared is not None
        try:
            value = await self._shared.get(self._namespace, key)
        except SharedStateUnavailable as exc:
            log.warning(
                "introspection_shared_cache_unavailable",
                extra={"provider": self._provider.name, "op": "get", "error_type": str(exc)},
            )
            return None
        if value is None:
            return None
        if value == _INACTIVE:
            return _INACTIVE_ANSWER
        # Judged again, as if the endpoint had just said it: the time has moved on, and
        # what Redis holds is no more trusted than what the endpoint says.
        try:
            reply = _json_object(value)
        except ValueError:
            reply = None
        answer = None if reply is None else self._judge(reply)
        if answer is None:
            log.warning(
                "introspection_shared_value_unusable", extra={"provider": self._provider.name}
            )
        return answer

    async def _keep(self, key: str, answer: _Answer) -> None:
        # SECURITY: the answer kept before goes, kept or not: a token found inactive must
        # not be served stale from an older active answer.
        self._cache.pop(key, None)
        settings = self._settings
        if settings.cache_ttl_s <= 0:
            return
        now = self._clock()
        if answer.claims is not None:
            fresh_until = now + settings.cache_ttl_s
            usable_until = fresh_until + settings.stale_if_error_s
            if answer.exp is not None:
                fresh_until = min(fresh_until, answer.exp)
                usable_until = min(usable_until, answer.exp)
        else:
            fresh_until = usable_until = now + settings.negative_cache_ttl_s
        if fresh_until <= now:
            return
        if self._local:
            self._cache[key] = _Entry(answer, fresh_until, usable_until)
            while len(self._cache) > settings.cache_size:
                self._cache.popitem(last=False)
        if self._shared is None:
            return
        if answer.claims is not None:
            value = json.dumps(answer.claims, separators=(",", ":"), ensure_ascii=False).encode()
        elif answer is _INACTIVE_ANSWER:
            value = _INACTIVE
        else:
            return  # an active answer refused here: this process's business alone
        try:
            await self._shared.put(self._namespace, key, value, fresh_until - now)
        except SharedStateUnavailable as exc:
            log.warning(
                "introspection_shared_cache_unavailable",
                extra={"provider": self._provider.name, "op": "put", "error_type": str(exc)},
            )

    # -- the endpoint ------------------------------------------------------------------

    async def _endpoint(self) -> str | None:
        if self._settings.endpoint is not None:
            return self._settings.endpoint
        assert self._discovery is not None
        try:
            return (await self._discovery.load()).introspection_endpoint
        except IdpUnavailable:
            return None  # discovery logged why

    async def _call(self, token: str) -> dict[str, Any] | None:
        """The provider's answer as a JSON object with a boolean ``active``, or None when
        there is none to be had (counted and logged here)."""
        name = self._provider.name
        endpoint = await self._endpoint()
        if endpoint is None:
            log.warning("introspection_unavailable", extra={"provider": name, "reason": "endpoint"})
            self._calls["error"].inc()
            return None
        headers = {"Accept": "application/json"}
        form = {"token": token, "token_type_hint": "access_token"}
        form.update(self._client_auth.fields(endpoint, headers))
        started = time.perf_counter()
        status: int | None = None
        body: bytes | None = None
        try:
            with (
                self._tracer.start_as_current_span(
                    "introspection",
                    kind=SpanKind.CLIENT,
                    attributes={"tokengate.provider": name},
                ),
                idp_call(self._metrics, "introspection"),
            ):
                async with self._http.post(
                    endpoint, data=form, headers=headers, timeout=self._timeout
                ) as resp:
                    status = resp.status
                    if status == 200:
                        body = await read_limited(resp.content.iter_any(), MAX_REPLY_BYTES)
        except IdpUnavailable:
            pass  # idp_call logged the error's type
        finally:
            self._duration.observe(time.perf_counter() - started)
        reply = None
        if body is not None:
            try:
                reply = _json_object(body)
            except ValueError:
                reply = None
        # SECURITY: exactly a JSON boolean; "true", 1 or no active at all is no answer,
        # and no answer fails closed.
        active = None if reply is None else reply.get("active")
        if reply is None or not isinstance(active, bool):
            if status is None:
                reason = "transport"  # idp_call logged the error's type
            elif status != 200:
                reason = f"status_{status}"
            else:
                reason = "reply"  # too large, not JSON, not an object, no boolean active
            log.warning("introspection_unavailable", extra={"provider": name, "reason": reason})
            self._calls["error"].inc()
            return None
        self._calls["active" if active else "inactive"].inc()
        return reply

    def _judge(self, reply: dict[str, Any]) -> _Answer | None:
        """The verdict on a reply (the endpoint's or the shared cache's); None when its
        ``active`` is no boolean (no answer)."""
        active = reply.get("active")
        if active is False:
            return _INACTIVE_ANSWER
        if active is not True:
            return None
        try:
            check_reply(
                reply,
                now=self._clock(),
                leeway_s=self._provider.leeway_s,
                issuer=self._provider.issuer,
                audience=self._provider.audience,
            )
        except InvalidTokenError as exc:
            return _Answer(None, (exc.result, exc.description), None)
        return _Answer(reply, None, jws.parse_numeric_date(reply.get("exp")))


def check_reply(
    reply: dict[str, Any],
    *,
    now: float,
    leeway_s: float,
    issuer: str | None,
    audience: tuple[str, ...],
) -> None:
    """The checks on an active answer (RFC 7662 §2.2), with a JWT's types (RFC 7519 §4.1,
    ``jws.check_claims``): exp, nbf and iat as numbers and times; iss, when present, the
    provider's; aud, when the provider has an audience, present and one of it; scope,
    client_id, sub, jti, token_type strings; cnf an object whose jkt is a string."""
    # iss is optional in an introspection answer (unlike in our JWTs): check_claims would
    # require it when given an issuer, so it is compared here.
    jws.check_claims(reply, now=now, leeway_s=leeway_s, issuer=None, audience=audience, require=())
    if "iss" in reply and issuer is not None and reply["iss"] != issuer:
        raise jws.invalid("wrong_issuer", "the token has the wrong issuer")
    token_type = reply.get("token_type")
    if "token_type" in reply and not isinstance(token_type, str):
        raise jws.invalid("malformed", "the token's token_type is not a string")
    if isinstance(token_type, str) and token_type.lower() in _NOT_ACCESS_TOKEN_TYPES:
        raise jws.invalid("wrong_type", "the token is not an access token")
    if "cnf" in reply:
        cnf = reply["cnf"]
        # RFC 7800 §3.1: a JSON object; RFC 9449 §6.2: jkt, RFC 8705 §3.1: x5t#S256, strings.
        if not isinstance(cnf, dict):
            raise jws.invalid("malformed", "the token's cnf claim is not an object")
        for member in ("jkt", "x5t#S256"):
            if member in cnf and not isinstance(cnf[member], str):
                raise jws.invalid("malformed", f"the token's cnf.{member} is not a string")


def _json_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for any other JSON value; ValueError when not JSON."""
    try:
        value = jws.strict_json(data)
    except RecursionError:
        raise ValueError("too deep") from None
    return value if isinstance(value, dict) else None

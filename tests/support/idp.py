"""A real OpenID Provider (panva/oidc-provider, tests/idp/server.js) for tests and the demo.

    idp = OidcProviderProcess(default_idp_config(redirect_uri=...)).start()
    ...
    idp.stop()

The browser part of a login is done over plain HTTP by :func:`complete_login`: it follows
the redirects, fills the IdP's login form (any login name, any password) and its consent
form, and hands back the redirect to the RP's callback without following it.

Cookies: the IdP lives on 127.0.0.1 and aiohttp's default ``CookieJar`` drops cookies of
IP hosts, so the session given to :func:`complete_login` / :func:`complete_logout` must be
made with ``aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))``.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

REPO_ROOT = Path(__file__).resolve().parents[2]
IDP_DIR = REPO_ROOT / "tests" / "idp"
SERVER_JS = IDP_DIR / "server.js"

DEFAULT_RESOURCE = "https://api.example.test"
DEFAULT_OPAQUE_RESOURCE = "https://opaque.example.test"  # with machine_clients
DEFAULT_SCOPES = "openid profile email offline_access api.read api.write"
CLIENT_SECRET = "tokengate-test-secret-0123456789abcdef"


class IdpError(RuntimeError):
    """The IdP process or a browser step against it did not do what was expected."""


def default_idp_config(
    redirect_uri: str | list[str] = "http://127.0.0.1:8080/auth/callback",
    *,
    post_logout_redirect_uri: str | list[str] | None = None,
    backchannel_logout_uri: str | None = None,
    resource: str = DEFAULT_RESOURCE,
    access_token_ttl: int = 5,
    refresh_token_ttl: int = 3600,
    id_token_ttl: int = 3600,
    session_ttl: int = 3600,
    pkjwt_jwks: dict[str, Any] | None = None,
    client_secret: str = CLIENT_SECRET,
    machine_clients: bool = False,
    opaque_resource: str = DEFAULT_OPAQUE_RESOURCE,
) -> dict[str, Any]:
    """The IDP_CONFIG used by the tests: three confidential clients sharing redirect URIs.

    - ``tokengate``        client_secret_basic (secret ``client_secret``)
    - ``tokengate-post``   client_secret_post  (same secret)
    - ``tokengate-pkjwt``  private_key_jwt, only when ``pkjwt_jwks`` (its public JWKS) is given

    With ``machine_clients``, for tokens that are not a user's and for introspection, two
    more (client_secret_basic, same secret, no redirect URIs) and a second resource server:

    - ``tokengate-m2m``    grant_types [client_credentials]: a machine's access tokens
    - ``tokengate-rs``     grant_types []: a resource server, in ``introspectors`` (may
      introspect any client's tokens)
    - ``opaque_resource``  its access tokens are opaque (``resource`` keeps JWTs)
    """
    redirect_uris = [redirect_uri] if isinstance(redirect_uri, str) else list(redirect_uri)
    if post_logout_redirect_uri is None:
        post_logout = [_origin(u) + "/" for u in redirect_uris]
    elif isinstance(post_logout_redirect_uri, str):
        post_logout = [post_logout_redirect_uri]
    else:
        post_logout = list(post_logout_redirect_uri)

    def client(client_id: str, method: str, **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "client_id": client_id,
            "token_endpoint_auth_method": method,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "redirect_uris": redirect_uris,
            "post_logout_redirect_uris": post_logout,
            **extra,
        }
        if backchannel_logout_uri:
            c["backchannel_logout_uri"] = backchannel_logout_uri
            c["backchannel_logout_session_required"] = True
        return c

    clients = [
        client("tokengate", "client_secret_basic", client_secret=client_secret),
        client("tokengate-post", "client_secret_post", client_secret=client_secret),
    ]
    if pkjwt_jwks is not None:
        clients.append(
            client(
                "tokengate-pkjwt",
                "private_key_jwt",
                jwks=pkjwt_jwks,
                token_endpoint_auth_signing_alg="RS256",
            )
        )
    config: dict[str, Any] = {
        "resource": resource,
        "resource_scopes": "api.read api.write",
        "access_token_ttl": access_token_ttl,
        "refresh_token_ttl": refresh_token_ttl,
        "id_token_ttl": id_token_ttl,
        "session_ttl": session_ttl,
        "interaction_ttl": 600,
        "grant_ttl": max(refresh_token_ttl, session_ttl),
        "clients": clients,
    }
    if machine_clients:
        machine = {
            "token_endpoint_auth_method": "client_secret_basic",
            "client_secret": client_secret,
            "response_types": [],
            "redirect_uris": [],
        }
        clients.append(
            {"client_id": "tokengate-m2m", "grant_types": ["client_credentials"], **machine}
        )
        clients.append({"client_id": "tokengate-rs", "grant_types": [], **machine})
        config["opaque_resource"] = opaque_resource
        config["introspectors"] = ["tokengate-rs"]
    return config


def make_client_key(kid: str = "tokengate-pkjwt") -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    """An RSA key for the private_key_jwt client: (private key object, public JWKS)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return key, {"keys": [{**public, "kid": kid, "use": "sig", "alg": "RS256"}]}


class OidcProviderProcess:
    """``node tests/idp/server.js`` on 127.0.0.1, started and stopped by the tests.

    Port 0 (the default) lets the server bind a free port itself and report it in its
    ``READY <port>`` line, so there is no window in which another process can take it.
    The server's log (stderr) goes to ``log_path``.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        node: str | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.config = dict(config if config is not None else default_idp_config())
        self.config["port"] = port
        self.config["host"] = host
        self._host = host
        self._node = node or shutil.which("node")
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._logdir: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> OidcProviderProcess:
        if self._proc is not None:
            raise IdpError("already started")
        if not self._node:
            raise IdpError("node is not on PATH (tests/idp needs Node.js >= 20.18)")
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise IdpError("tests/idp/node_modules is missing: run `npm ci --prefix tests/idp`")
        self._logdir = tempfile.TemporaryDirectory(prefix="tokengate-idp-")
        self.log_path = Path(self._logdir.name) / "idp.log"
        env = {**os.environ, "IDP_CONFIG": json.dumps(self.config)}
        env.pop("IDP_CONFIG_FILE", None)
        env.pop("IDP_PORT", None)
        env.pop("IDP_HOST", None)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [self._node, str(SERVER_JS)],
                cwd=IDP_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        try:
            self._port = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> int:
        if self._proc is None or self._proc.stdout is None:
            raise IdpError("not started")
        deadline = time.monotonic() + self._start_timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise IdpError(f"IdP not ready within {self._start_timeout}s\n{self.log()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait()
                    raise IdpError(f"IdP exited with {code} before READY\n{self.log()}")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    parts = line.decode(errors="replace").split()
                    if len(parts) == 2 and parts[0] == "READY":
                        return int(parts[1])

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
            self.log_path = None

    def __enter__(self) -> OidcProviderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """What the server wrote to stderr so far (for failure messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    # -- addresses ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise IdpError("not started")
        return self._port

    @property
    def issuer(self) -> str:
        return self.config.get("issuer") or f"http://{self._host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self._host}:{self.port}/{path.lstrip('/')}"

    @property
    def discovery_url(self) -> str:
        return self.url("/.well-known/openid-configuration")

    @property
    def resource(self) -> str:
        return str(self.config.get("resource", DEFAULT_RESOURCE))

    # -- test control (/__test/*) -------------------------------------------------------

    @asynccontextmanager
    async def _session(
        self, session: aiohttp.ClientSession | None
    ) -> AsyncIterator[aiohttp.ClientSession]:
        if session is not None:
            yield session
            return
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as own:
            yield own

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> Any:
        async with (
            self._session(session) as s,
            s.request(method, self.url(path), json=body) as resp,
        ):
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise IdpError(f"{method} {path}: {resp.status} {data}")
            return data

    async def stats(self, session: aiohttp.ClientSession | None = None) -> dict[str, Any]:
        """Counts since start/reset: ``grants`` (successful token responses by grant_type),
        ``errors`` and ``errors_by_grant_type`` (token endpoint errors by code),
        ``token_requests``, ``injected``, ``revocations``, ``introspections``,
        ``authorizations``, ``end_sessions``, ``backchannel_logout``."""
        result: dict[str, Any] = await self._call("GET", "/__test/stats", session=session)
        return result

    async def reset(self, session: aiohttp.ClientSession | None = None) -> None:
        """Zero the counts and restore normal token-endpoint behaviour."""
        await self._call("POST", "/__test/reset", {}, session=session)

    async def set_token_behaviour(
        self,
        *,
        delay_ms: int | None = None,
        status: int | None = None,
        error: str | None = None,
        hang: bool = False,
        grant_type: str | None = None,
        times: int | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> dict[str, Any]:
        """Make the token endpoint slow (``delay_ms``, then served normally), fail
        (``status`` with ``{"error": error}``, never reaching the provider) or ``hang``;
        only for ``grant_type`` if given, only the next ``times`` requests if given.
        No arguments = normal again."""
        body = {
            "delay_ms": delay_ms,
            "status": status,
            "error": error,
            "hang": hang,
            "grant_type": grant_type,
            "times": times,
        }
        result: dict[str, Any] = await self._call(
            "POST", "/__test/token-behaviour", body, session=session
        )
        return result

    async def update_client(
        self, client_id: str, session: aiohttp.ClientSession | None = None, **metadata: Any
    ) -> None:
        """Create ``client_id`` or merge ``metadata`` into it (``None`` removes a field),
        e.g. ``redirect_uris=[gw + "/auth/callback"], backchannel_logout_uri=...`` once a
        gateway's port is known. Invalid metadata raises :class:`IdpError`."""
        await self._call(
            "POST", "/__test/clients", {"client_id": client_id, **metadata}, session=session
        )

    async def sessions(
        self, sub: str | None = None, session: aiohttp.ClientSession | None = None
    ) -> list[dict[str, Any]]:
        """Live IdP sessions: ``[{"sub", "session_uid", "clients": {id: {"sid", "grant_id"}}}]``."""
        path = "/__test/sessions" + (f"?sub={sub}" if sub is not None else "")
        result: list[dict[str, Any]] = await self._call("GET", path, session=session)
        return result

    async def backchannel_logout(
        self,
        sub: str,
        *,
        sid: str | None = None,
        client_id: str | None = None,
        end_session: bool = True,
        session: aiohttp.ClientSession | None = None,
    ) -> dict[str, Any]:
        """Have the IdP send its real back-channel logout token(s) for ``sub``'s sessions
        (only the session with ``sid``, only ``client_id``, if given); with ``end_session``
        the IdP session ends and its grants are revoked too. Returns once the RPs answered:
        ``{"sessions": n, "deliveries": [{"client_id", "sid", "ok", "error"?}]}``."""
        body = {"sub": sub, "sid": sid, "client_id": client_id, "end_session": end_session}
        result: dict[str, Any] = await self._call(
            "POST", "/__test/backchannel-logout", body, session=session
        )
        return result

    async def login(
        self,
        session: aiohttp.ClientSession,
        start_url: str,
        login: str = "alice",
        password: str = "pw",
    ) -> str:
        """:func:`complete_login` with this IdP's origin."""
        return await complete_login(
            session, start_url, login, password, idp_origin=_origin(self.issuer)
        )


# -- the browser part ------------------------------------------------------------------


class _Form:
    def __init__(self, attrs: dict[str, str | None]) -> None:
        self.id = attrs.get("id")
        self.action = attrs.get("action") or ""
        self.method = (attrs.get("method") or "get").lower()
        self.fields: list[tuple[str, str, str]] = []  # (name, type, value)
        self.submits: list[tuple[str, str]] = []  # named submit buttons (name, value)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self._current: _Form | None = None
        self._orphans: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = dict(attrs_list)
        if tag == "form":
            self._current = _Form(attrs)
            self.forms.append(self._current)
        elif tag in ("input", "button"):
            if attrs.get("form"):
                self._orphans.append((tag, attrs))  # belongs to the form with that id
            else:
                self._add(self._current, tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None

    def close(self) -> None:
        super().close()
        by_id = {f.id: f for f in self.forms if f.id}
        for tag, attrs in self._orphans:
            self._add(by_id.get(attrs.get("form")), tag, attrs)

    @staticmethod
    def _add(form: _Form | None, tag: str, attrs: dict[str, str | None]) -> None:
        if form is None:
            return
        name = attrs.get("name")
        kind = (attrs.get("type") or ("submit" if tag == "button" else "text")).lower()
        value = attrs.get("value") or ""
        if kind == "submit":
            if name:
                form.submits.append((name, value))
        elif name:
            form.fields.append((name, kind, value))


def parse_forms(html: str) -> list[_Form]:
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _is_authorization_request(url: str) -> bool:
    query = parse_qs(urlsplit(url).query)
    return "client_id" in query and ("response_type" in query or "request_uri" in query)


def _check_jar(session: aiohttp.ClientSession) -> None:
    jar = session.cookie_jar
    if isinstance(jar, aiohttp.CookieJar) and not getattr(jar, "unsafe", True):
        raise IdpError(
            "the IdP is on 127.0.0.1: use aiohttp.ClientSession("
            "cookie_jar=aiohttp.CookieJar(unsafe=True)), the default jar drops its cookies"
        )


async def _browse(
    session: aiohttp.ClientSession,
    start_url: str,
    fill: dict[str, str],
    submit_choice: dict[str, str],
    idp_origin: str | None,
    max_steps: int,
) -> str:
    """Follow redirects and submit the IdP's forms until a redirect leaves the IdP.

    Returns that redirect's absolute URL; or, when the IdP ends on a page without a
    form (e.g. the end-session success page), that page's URL.
    """
    _check_jar(session)
    method, url, data = "GET", start_url, None
    if idp_origin is None and _is_authorization_request(start_url):
        idp_origin = _origin(start_url)
    for _ in range(max_steps):
        async with session.request(method, url, data=data, allow_redirects=False) as resp:
            body = await resp.text()
            location = resp.headers.get("Location")
        if resp.status in (301, 302, 303, 307, 308) and location:
            target = urljoin(url, location)
            if idp_origin is None and _is_authorization_request(target):
                idp_origin = _origin(target)
            leaving_idp = idp_origin is not None and _origin(url) == idp_origin
            if leaving_idp and _origin(target) != idp_origin:
                return target
            if resp.status not in (307, 308):
                method, data = "GET", None
            url = target
            continue
        if resp.status != 200:
            raise IdpError(f"{method} {url} -> {resp.status}: {body[:500]}")
        forms = [f for f in parse_forms(body) if f.method == "post"]
        if not forms:
            return url
        form = next((f for f in forms if any(t == "password" for _, t, _ in f.fields)), forms[0])
        fields: list[tuple[str, str]] = []
        for name, kind, value in form.fields:
            if name in fill:
                fields.append((name, fill[name]))
            elif kind in ("hidden", "text", "password", "email"):
                fields.append((name, value))
        for name, value in form.submits:
            if submit_choice.get(name) == value:
                fields.append((name, value))
                break
        method, url, data = "POST", urljoin(url, form.action or url), fields
    raise IdpError(f"no redirect away from the IdP after {max_steps} steps (last: {url})")


async def complete_login(
    session: aiohttp.ClientSession,
    start_url: str,
    login: str = "alice",
    password: str = "pw",
    *,
    idp_origin: str | None = None,
    max_steps: int = 20,
) -> str:
    """Log in at the IdP like a browser, starting from ``start_url``.

    ``start_url`` is the RP's login URL (tokengate's ``/auth/login``) or an authorization
    URL. Redirects are followed by hand; the IdP's login form (fields ``login`` and
    ``password``; any values are accepted, sub = login) and consent form are submitted.
    Returns the absolute URL of the first redirect that leaves the IdP (the RP's
    redirect_uri with ``code``, ``state`` and ``iss``, or with ``error``) WITHOUT
    following it. A second login in the same cookie jar skips the forms (IdP session and
    grant exist).

    The IdP's origin is ``idp_origin`` if given, else that of the first URL that carries
    an authorization request (``client_id`` and ``response_type`` query parameters).
    ``session`` must have ``cookie_jar=aiohttp.CookieJar(unsafe=True)``.
    """
    return await _browse(
        session,
        start_url,
        fill={"login": login, "password": password},
        submit_choice={},
        idp_origin=idp_origin,
        max_steps=max_steps,
    )


async def complete_logout(
    session: aiohttp.ClientSession,
    end_session_url: str,
    *,
    everywhere: bool = True,
    max_steps: int = 10,
) -> str:
    """Finish an RP-initiated logout at the IdP like a browser.

    ``end_session_url`` is the IdP's end_session_endpoint URL with its parameters (e.g.
    where tokengate's ``/auth/logout`` sends the browser). Submits the IdP's "sign me out"
    form; with ``everywhere`` (``logout=yes``) the IdP ends its session and sends
    back-channel logout tokens to every client of that session before redirecting.
    Returns the ``post_logout_redirect_uri`` redirect (not followed), or the URL of the
    IdP's own "signed out" page.
    """
    return await _browse(
        session,
        end_session_url,
        fill={},
        submit_choice={"logout": "yes"} if everywhere else {},
        idp_origin=_origin(end_session_url),
        max_steps=max_steps,
    )

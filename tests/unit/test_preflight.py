"""What check-config accepts, run starts with: the builds both pass (``gateway.preflight``)
and the Redis URL forms the README documents."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from gateway import preflight
from gateway.cli import main
from gateway.sessions.redis_store import _SentinelMaster, build_redis, parse_multi_host_url
from gateway.settings import ConfigError, SessionSettings, Settings, parse_settings

CAPTURE_ROUTE = {"prefix": "/login", "upstream": "http://127.0.0.1:9", "auth": "none"}


def session_settings(url: str) -> SessionSettings:
    return SessionSettings(redis_url=url)


def sessions_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "public_url": "https://app.example.com",
        "oidc": {"issuer": "https://idp.example.com", "client_id": "bff"},
        "routes": [{"prefix": "/api", "upstream": "http://127.0.0.1:9", "auth": "session"}],
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    ("url", "kind", "nodes"),
    [
        ("redis://127.0.0.1:6379/0", Redis, None),
        ("rediss://user:pw@redis.example.com:6380/2", Redis, None),
        ("unix:///run/redis.sock", Redis, None),
        ("redis+sentinel://s1:26379,s2:26380/mymaster/1", _SentinelMaster, None),
        ("redis+sentinel://:pw@s1/mymaster", _SentinelMaster, None),
        ("redis+sentinel://s1,s2/mymaster/0?sentinel_password=spw", _SentinelMaster, None),
        ("rediss+sentinel://u:pw@s1:26379/mymaster?ssl_ca_certs=/ca.pem", _SentinelMaster, None),
        ("redis+cluster://h1:7000", RedisCluster, [("h1", 7000)]),
        (
            "redis+cluster://user:pw@h1:7000,h2:7001,h3",
            RedisCluster,
            [("h1", 7000), ("h2", 7001), ("h3", 6379)],
        ),
        ("rediss+cluster://h1:7000,[::1]:7001/0", RedisCluster, [("h1", 7000), ("::1", 7001)]),
    ],
)
async def test_every_documented_redis_url_builds_a_client_without_connecting(
    url: str, kind: type, nodes: list[tuple[str, int]] | None
) -> None:
    client = build_redis(session_settings(url))
    try:
        assert isinstance(client, kind)
        if nodes is not None:
            assert isinstance(client, RedisCluster)
            seeds = [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()]
            assert sorted(seeds) == sorted(nodes)
    finally:
        await client.aclose()


def test_cluster_url_carries_credentials_and_tls() -> None:
    parsed = parse_multi_host_url("rediss+cluster://u%40x:p%3Aw@h1:1,h2:2/0", 6379)
    assert (parsed.username, parsed.password) == ("u@x", "p:w")
    assert parsed.nodes == (("h1", 1), ("h2", 2))
    assert "p:w" not in repr(parsed)


async def test_a_rediss_cluster_url_builds_every_node_with_tls() -> None:
    client = build_redis(session_settings("rediss+cluster://h1:7000,h2:7001?ssl_ca_certs=/ca.pem"))
    try:
        assert isinstance(client, RedisCluster)
        for node in client.nodes_manager.startup_nodes.values():
            assert issubclass(node.connection_class, SSLConnection)
            assert node.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    finally:
        await client.aclose()


async def test_a_sentinel_url_gives_the_sentinels_their_own_credentials_and_tls() -> None:
    url = (
        "rediss+sentinel://app:m%40ster@s1:26379,s2/mymaster/2"
        "?sentinel_username=watch&sentinel_password=s%2Bpw&ssl_ca_certs=/etc/ca.pem"
    )
    client = build_redis(session_settings(url))
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        master = pool.connection_kwargs
        assert (master["username"], master["password"], master["db"]) == ("app", "m@ster", 2)
        assert issubclass(pool.connection_class, SSLConnection)
        assert master["ssl_ca_certs"] == "/etc/ca.pem"
        for sentinel in pool.sentinel_manager.sentinels:
            options = sentinel.connection_pool.connection_kwargs
            assert (options["username"], options["password"]) == ("watch", "s+pw")
            assert issubclass(sentinel.connection_pool.connection_class, SSLConnection)
            assert options["ssl_ca_certs"] == "/etc/ca.pem"
            assert options["socket_timeout"] == 1.0  # half of redis_timeout_s a try
    finally:
        await client.aclose()


async def test_a_plain_sentinel_url_sends_the_sentinels_no_credentials() -> None:
    client = build_redis(session_settings("redis+sentinel://:pw@s1/mymaster"))
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.connection_kwargs["password"] == "pw"
        sentinel = pool.sentinel_manager.sentinels[0].connection_pool
        assert sentinel.connection_kwargs.get("password") is None
        assert not issubclass(sentinel.connection_class, SSLConnection)
    finally:
        await client.aclose()


def test_check_config_masks_a_sentinel_password_in_the_query(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokengate.yaml"
    url = "redis+sentinel://:hunter2@s1/mymaster?sentinel_password=sesame"
    path.write_text(
        "public_url: https://app.example.com\n"
        "oidc: {issuer: https://idp.example.com, client_id: bff}\n"
        f"session: {{redis_url: '{url}'}}\n"
        "routes: [{prefix: /api, upstream: 'http://127.0.0.1:9', auth: session}]\n"
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sentinel_password=**********" in out
    assert "hunter2" not in out
    assert "sesame" not in out


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h1:abc",
        "redis+cluster://h1:7000,:7001",
        "redis+cluster://h1:7000/3",
        "redis+cluster://h1:99999",
        "redis+cluster://h1:7000?ssl=true",
        "redis+cluster://h1:7000?ssl_ca_certs=/ca.pem",  # without TLS: a mistake
        "redis+sentinel://s1/mymaster?sentinel_pasword=x",
        "redis+sentinel://s1/mymaster?sentinel_password=a&sentinel_password=b",
        "redis+sentinel://s1/mymaster#x",
        "redis+sentinel://s1:26379",
        "redis://h:abc/0",
    ],
)
async def test_an_unbuildable_redis_url_fails_check_config_naming_the_key(url: str) -> None:
    settings = parse_settings(sessions_config(session={"redis_url": url}))
    with pytest.raises(ConfigError, match=r"^session\.redis_url: "):
        await preflight.check(settings)


@pytest.mark.parametrize(
    ("capture", "key"),
    [
        ({"subject_path": "user..id"}, "routes.0.capture_tokens.subject_path"),
        ({"claims_paths": {"email": "data."}}, "routes.0.capture_tokens.claims_paths.email"),
        ({"response": {"access_token": ".token"}}, "routes.0.capture_tokens.response.access_token"),
    ],
)
async def test_a_bad_capture_path_fails_at_start_not_at_login(
    capture: dict[str, Any], key: str
) -> None:
    settings = parse_settings(
        {
            "public_url": "https://app.example.com",
            "session": {"store": "memory"},
            "routes": [{**CAPTURE_ROUTE, "capture_tokens": capture}],
        }
    )
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        await preflight.check(settings)


def _pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def private_key_settings(pem: str, alg: str) -> Settings:
    return parse_settings(
        sessions_config(
            session={"store": "memory"},
            oidc={
                "issuer": "https://idp.example.com",
                "client_id": "bff",
                "client_auth": "private_key_jwt",
                "private_key": pem,
                "private_key_alg": alg,
            },
        )
    )


async def test_a_private_key_that_does_not_fit_its_algorithm_fails_at_start() -> None:
    rsa_pem = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    p384_pem = _pem(ec.generate_private_key(ec.SECP384R1()))
    await preflight.check(private_key_settings(rsa_pem, "RS256"))
    with pytest.raises(ConfigError, match="does not fit private_key_alg ES256"):
        await preflight.check(private_key_settings(rsa_pem, "ES256"))
    with pytest.raises(ConfigError, match="does not fit private_key_alg ES256"):
        await preflight.check(private_key_settings(p384_pem, "ES256"))
    with pytest.raises(ConfigError) as raised:
        await preflight.check(
            private_key_settings("-----BEGIN PRIVATE KEY-----\nsecretbits", "RS256")
        )
    assert "secretbits" not in str(raised.value)


def test_check_config_and_run_refuse_the_same_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokengate.yaml"
    path.write_text(
        "public_url: https://app.example.com\n"
        "oidc: {issuer: https://idp.example.com, client_id: bff}\n"
        "session: {redis_url: 'redis+cluster://h1:7000,h2:x'}\n"
        "routes: [{prefix: /api, upstream: 'http://127.0.0.1:9', auth: session}]\n"
    )
    served: list[Settings] = []
    monkeypatch.setattr("gateway.cli.run", lambda settings, _path: served.append(settings) or 0)
    assert main(["check-config", "--config", str(path)]) == 2
    assert main(["run", "--config", str(path)]) == 2
    assert served == []  # run never reached serving
    err = capsys.readouterr().err
    assert err.count("session.redis_url:") == 2

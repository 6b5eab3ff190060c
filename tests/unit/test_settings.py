"""Configuration: YAML + environment, secrets from files, errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import main
from gateway.settings import ConfigError, dump_settings, load_settings, parse_settings

ROUTE = {"prefix": "/api", "upstream": "http://127.0.0.1:9000", "auth": "none"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokengate.yaml"
    path.write_text(text)
    return path


def test_environment_overrides_yaml_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "oidc: {issuer: https://a.example, client_id: spa}\nworkers: 1\n")
    monkeypatch.setenv("TOKENGATE_OIDC__ISSUER", "https://b.example")
    monkeypatch.setenv("TOKENGATE_WORKERS", "3")
    settings = load_settings(path)
    assert settings.oidc.issuer == "https://b.example"
    assert settings.oidc.client_id == "spa"  # untouched by the environment
    assert settings.workers == 3


def test_secret_from_file_is_read_and_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text("s3cr3t-value\n")
    monkeypatch.setenv("TOKENGATE_OIDC__CLIENT_SECRET_FILE", str(secret))
    settings = load_settings(write(tmp_path, "oidc: {issuer: https://idp.example}\n"))
    assert settings.oidc.client_secret is not None
    assert settings.oidc.client_secret.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(dump_settings(settings))


def test_redis_password_is_masked_in_the_dump() -> None:
    settings = parse_settings({"session": {"redis_url": "redis://:hunter2@redis:6379/0"}})
    assert "hunter2" not in str(dump_settings(settings))


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"oidc": {"isuer": "https://x"}}, "oidc.isuer: unknown key"),
        ({"oidc": {"algorithms": ["none"]}}, "oidc.algorithms"),
        ({"oidc": {"algorithms": ["RS256", "HS256"]}}, "oidc.algorithms"),
        ({"oidc": {"issuer": "http://idp.example.com"}}, "oidc.issuer"),
        ({"routes": [{**ROUTE, "upstream": "ftp://x"}]}, "routes.0.upstream"),
        ({"routes": [{**ROUTE, "prefix": "api"}]}, "routes.0.prefix"),
        ({"routes": [{**ROUTE, "prefix": "/a/../b"}]}, "routes.0.prefix"),
        ({"routes": [ROUTE, {**ROUTE, "prefix": "/api/"}]}, "routes.1.prefix"),
        ({"routes": [{**ROUTE, "prefix": "/auth/x"}]}, "routes.0.prefix"),
        ({"routes": [{**ROUTE, "auth": "bearer"}]}, "routes.0.auth"),
        ({"oidc": {"client_auth": "client_secret_post"}}, "oidc"),
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"listen": {"port": 9000}, "admin": {"port": 9000}}, "admin.port"),
        (
            {"oidc": {"issuer": "https://idp.example"}, "routes": [{**ROUTE, "auth": "bearer"}]},
            "oidc.audience",
        ),
        ({"refresh": {"token_endpoint": "http://evil.example/token"}}, "refresh.token_endpoint"),
        ({"oidc": {"post_logout_redirect_uri": "javascript:x"}}, "oidc.post_logout_redirect_uri"),
        ({"session": {"idle_timeout_s": 60, "local_cache_s": 60}}, "local_cache_s must be <"),
    ],
)
def test_bad_configuration_names_the_key(config: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(config)
    assert key in str(raised.value)


def test_nested_prefixes_are_allowed_longest_wins() -> None:
    settings = parse_settings({"routes": [ROUTE, {**ROUTE, "prefix": "/api/admin"}]})
    assert [r.name for r in settings.routes] == ["api", "api_admin"]


@given(name=st.text(min_size=1, max_size=20))
def test_an_identity_header_name_is_a_token_or_refused(name: str) -> None:
    """A configured identity header goes upstream under its name as written: only RFC 9110
    token characters (no space, colon, CR or LF to make another header of it)."""
    config = {"routes": [{**ROUTE, "identity_headers": {name: "sub"}}]}
    if re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        assert parse_settings(config).routes[0].identity_headers == {name: "sub"}
    else:
        with pytest.raises(ConfigError, match="identity_headers"):
            parse_settings(config)


def test_http_issuer_allowed_on_loopback_only() -> None:
    assert parse_settings({"oidc": {"issuer": "http://127.0.0.1:9/"}}).oidc.issuer == (
        "http://127.0.0.1:9"
    )


def test_check_config_prints_and_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "oidc: {issuer: https://idp.example, client_secret: topsecret}\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"issuer": "https://idp.example"' in out
    assert "topsecret" not in out


def test_check_config_fails_with_key_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "routes: [{prefix: /x, upstream: 'nope'}]\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "routes.0.upstream" in capsys.readouterr().err


def test_unreadable_and_non_mapping_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_non_json_list_in_the_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENGATE_OIDC__AUDIENCE", "https://api.example")
    with pytest.raises(ConfigError, match="oidc"):
        parse_settings({})

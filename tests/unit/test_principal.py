"""Scopes: a space-delimited ``scope`` is split on U+0020 only (RFC 6749 §3.3), the same way
in a token's claims and in a token endpoint's reply; other whitespace belongs to a scope."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.idp.tokens import parse_scope_field
from gateway.principal import parse_scope_tokens, parse_scopes

# Whitespace to str.split() but not a scope-token separator.
NOT_SEPARATORS = ["\u00a0", "\t", "\n", "\r", "\x0b", "\x0c", "\u2003", "\u3000", "\u2028", "\x1c"]


@pytest.mark.parametrize("space", NOT_SEPARATORS)
def test_a_scope_joined_by_other_whitespace_is_one_scope(space: str) -> None:
    odd = f"openid{space}api.read"
    assert parse_scopes({"scope": odd}) == {odd}
    assert parse_scopes({"scope": f"profile {odd}"}) == {"profile", odd}
    assert parse_scope_field(odd) == (odd,)


def test_runs_of_spaces_give_no_empty_scope() -> None:
    assert parse_scope_tokens("  api.read   api.write ") == ("api.read", "api.write")
    assert parse_scope_tokens("") == ()
    assert parse_scope_tokens("   ") == ()
    assert parse_scopes({"scope": " "}) == frozenset()


def test_scope_wins_over_scp_and_scp_keeps_only_strings() -> None:
    assert parse_scopes({"scope": "a b", "scp": ["c"]}) == {"a", "b"}
    assert parse_scopes({"scp": ["c", "d"]}) == {"c", "d"}
    # Unverified claims (token capture, a login's access token) may be mistyped.
    assert parse_scopes({"scp": ["c", 5, None, ["d"]]}) == {"c"}
    assert parse_scope_field(["c", 5]) == ("c",)
    assert parse_scopes({"scope": 5}) == frozenset()
    assert parse_scope_field(5) is None


SCOPE_TOKENS = st.lists(st.text(min_size=1).filter(lambda token: " " not in token))


@given(SCOPE_TOKENS)
def test_scope_tokens_joined_by_spaces_parse_back(tokens: list[str]) -> None:
    joined = " ".join(tokens)
    assert parse_scope_tokens(joined) == tuple(tokens)
    assert parse_scope_field(joined) == tuple(tokens)
    assert parse_scopes({"scope": joined}) == frozenset(tokens)


@given(st.text(alphabet=st.sampled_from([" ", "a", "b", *NOT_SEPARATORS])) | st.text())
def test_no_parsed_scope_is_empty_or_holds_a_space(scope: str) -> None:
    parsed = parse_scope_tokens(scope)
    assert all(token and " " not in token for token in parsed)
    assert "".join(parsed) == scope.replace(" ", "")  # nothing else is lost
    assert parse_scope_field(scope) == parsed
    assert parse_scopes({"scope": scope}) == frozenset(parsed)

"""Session crypto: what the cookie's secret becomes, and what a sealed blob resists."""

from __future__ import annotations

import secrets

import pytest

from gateway.sessions.crypto import (
    derive_handle,
    digest,
    open_sealed,
    open_session,
    seal,
    seal_session,
    slot_aad,
)
from gateway.sessions.model import Session


def test_a_secret_always_derives_the_same_handle() -> None:
    secret = secrets.token_bytes(32)
    assert derive_handle(secret) == derive_handle(secret)
    assert derive_handle(secret) != derive_handle(secrets.token_bytes(32))


def test_storage_id_is_independent_of_the_key_and_the_secret() -> None:
    secret = secrets.token_bytes(32)
    handle = derive_handle(secret)
    assert len(handle.storage_id) == 64
    assert len(handle.key) == 32
    assert bytes.fromhex(handle.storage_id) != handle.key
    for revealing in (secret.hex(), handle.key.hex()):
        assert revealing not in handle.storage_id
        assert handle.storage_id not in revealing


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_only_a_32_byte_secret_makes_a_handle(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        derive_handle(secrets.token_bytes(size))


def test_sealed_blob_opens_with_its_key_and_aad() -> None:
    key, aad = secrets.token_bytes(32), slot_aad("session", "abc")
    blob = seal(key, b"tokens", aad)
    assert b"tokens" not in blob
    assert open_sealed(key, blob, aad) == b"tokens"


def test_sealing_twice_gives_different_blobs() -> None:
    key, aad = secrets.token_bytes(32), slot_aad("session", "abc")
    assert seal(key, b"tokens", aad) != seal(key, b"tokens", aad)


def test_tampered_blob_opens_to_none() -> None:
    key, aad = secrets.token_bytes(32), slot_aad("session", "abc")
    blob = bytearray(seal(key, b"tokens", aad))
    for index in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[index] ^= 0x80
        assert open_sealed(key, bytes(tampered), aad) is None


def test_wrong_key_opens_to_none() -> None:
    aad = slot_aad("session", "abc")
    blob = seal(secrets.token_bytes(32), b"tokens", aad)
    assert open_sealed(secrets.token_bytes(32), blob, aad) is None


def test_blob_moved_to_another_slot_opens_to_none() -> None:
    key = secrets.token_bytes(32)
    blob = seal(key, b"tokens", slot_aad("session", "abc"))
    assert open_sealed(key, blob, slot_aad("session", "abd")) is None
    assert open_sealed(key, blob, slot_aad("login", "abc")) is None


@pytest.mark.parametrize("blob", [b"", b"short", bytes(27)])
def test_short_blob_opens_to_none(blob: bytes) -> None:
    assert open_sealed(secrets.token_bytes(32), blob, b"aad") is None


def test_sealing_needs_an_aes_256_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        seal(secrets.token_bytes(16), b"tokens", b"aad")


def test_digest_is_sha256_hex_and_hides_the_value() -> None:
    value = "alice@example.test"
    assert digest(value) == digest(value)
    assert len(digest(value)) == 64
    assert value not in digest(value)
    assert digest(value) != digest(value + " ")


def test_session_sealed_to_one_handle_opens_only_with_it() -> None:
    handle, other = derive_handle(secrets.token_bytes(32)), derive_handle(secrets.token_bytes(32))
    session = Session(subject="alice", access_token="at", access_expires_at=1.0, version=4)
    blob = seal_session(handle, session)
    assert open_session(handle, blob, 4) == session
    assert open_session(other, blob, 4) is None


def test_a_blob_from_an_incompatible_release_opens_to_none() -> None:
    handle = derive_handle(secrets.token_bytes(32))
    for plaintext in (b"not json", b'{"subject":"alice","unknown_field":1}'):
        blob = seal(handle.key, plaintext, slot_aad("session", handle.storage_id))
        assert open_session(handle, blob, 1) is None

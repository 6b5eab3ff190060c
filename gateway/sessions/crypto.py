"""The session's cryptography: from the cookie's secret to a storage id and a key, and the
sealing of what a store keeps under them.

Pure functions, no I/O. Which blob lives where, and for how long, is the stores' business
(``sessions.redis_store``, ``sessions.memory_store``); the cookie is ``sessions.cookie``'s.
"""

from __future__ import annotations

import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.sessions.model import Session, SessionHandle

# SECURITY: distinct HKDF `info` labels (RFC 5869 §3.2) make the storage id and the key
# independent outputs of one secret: the id, which Redis keeps, says nothing of the key.
_STORAGE_ID_INFO = b"tokengate/v1 session storage id"
_KEY_INFO = b"tokengate/v1 session encryption key"
_SECRET_BYTES = 32
_KEY_BYTES = 32  # AES-256
_NONCE_BYTES = 12  # 96 bits, the GCM nonce size (NIST SP 800-38D §8.2)
_TAG_BYTES = 16


def _hkdf(secret: bytes, info: bytes) -> bytes:
    # No salt: the input is already 256 uniformly random bits (RFC 5869 §3.1).
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(secret)


def derive_handle(secret: bytes) -> SessionHandle:
    """The storage id (hex) and the AES-256 key that the cookie's 32-byte secret stands for."""
    if len(secret) != _SECRET_BYTES:
        raise ValueError("a session secret is 32 bytes")
    return SessionHandle(
        storage_id=_hkdf(secret, _STORAGE_ID_INFO).hex(),
        key=_hkdf(secret, _KEY_INFO),
    )


def slot_aad(kind: str, slot_id: str) -> bytes:
    """Associated data naming where a blob belongs, so it cannot be moved to another slot."""
    return f"tokengate/v1 {kind} {slot_id}".encode()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag`` with a fresh random nonce."""
    if len(key) != _KEY_BYTES:
        raise ValueError("an AES-256 key is 32 bytes")
    # SECURITY: random nonces are safe far beyond our write counts per key (2^32 messages,
    # NIST SP 800-38D §8.3); every session has its own key.
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    """The plaintext of a ``seal`` result, or None if the key, the AAD or the blob is wrong."""
    if len(key) != _KEY_BYTES or len(blob) < _NONCE_BYTES + _TAG_BYTES:
        return None
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag:
        return None


def seal_session(handle: SessionHandle, session: Session) -> bytes:
    """The session's JSON (its version stays outside), sealed to its handle's slot."""
    return seal(handle.key, session.to_json(), slot_aad("session", handle.storage_id))


def open_session(handle: SessionHandle, blob: bytes, version: int) -> Session | None:
    """The session a ``seal_session`` blob holds, or None if it does not open."""
    plaintext = open_sealed(handle.key, blob, slot_aad("session", handle.storage_id))
    if plaintext is None:
        return None  # a tampered blob, or one moved from another session
    try:
        return Session.from_json(plaintext, version)
    except (ValueError, TypeError):
        return None  # written by an incompatible release: the user logs in again


def digest(value: str) -> str:
    """SHA-256 hex of an identifier (sub, sid, jti, state), for index keys a dump may show."""
    return hashlib.sha256(value.encode()).hexdigest()

"""Authenticated encryption of Shamir shares between two clients, routed by the server.

AES-256-GCM with a random 96-bit nonce. The associated data binds the session id, the sender
and the recipient, so the server cannot replay a ciphertext into another session, swap it to
another recipient, or pass it off as coming from someone else: each fails as
:class:`DecryptionError`. The key comes from :func:`secagg.keys.derive_pair_key`, itself bound to
the session and the pair.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secagg.errors import ConfigurationError, DecryptionError
from secagg.ids import check_session_id, id_bytes

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
_AD_DOMAIN = b"fedsec/secagg/v1/share-ciphertext"


def _associated_data(session_id: bytes, sender: int, recipient: int) -> bytes:
    return _AD_DOMAIN + check_session_id(session_id) + id_bytes(sender) + id_bytes(recipient)


def seal(key: bytes, plaintext: bytes, session_id: bytes, sender: int, recipient: int) -> bytes:
    """nonce || AES-GCM(key, nonce, plaintext, AD = (session, sender, recipient))."""
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"share encryption key must be {KEY_BYTES} bytes")
    nonce = os.urandom(NONCE_BYTES)
    ad = _associated_data(session_id, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(
    key: bytes, ciphertext: bytes, session_id: bytes, sender: int, recipient: int
) -> bytes:
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"share encryption key must be {KEY_BYTES} bytes")
    if len(ciphertext) < OVERHEAD_BYTES:
        raise DecryptionError(f"ciphertext from client {sender} is truncated")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _associated_data(session_id, sender, recipient))
    except InvalidTag:
        raise DecryptionError(
            f"ciphertext from client {sender} to client {recipient} fails authentication "
            "(tampered, replayed from another session, or misrouted)"
        ) from None

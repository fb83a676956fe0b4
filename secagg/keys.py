"""Key material: Ed25519 identities, X25519 ephemeral key pairs, and bound key derivation.

Every symmetric key in the protocol comes from :func:`derive_pair_key`: HKDF-SHA256 over an
X25519 shared secret with the session id as salt and (purpose, both client ids) in the info
field. A key derived for one session, one pair or one purpose is therefore useless for any
other, which is what turns a replayed or misrouted message into a clean authentication failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import (
    ConfigurationError,
    InvalidPublicKey,
    InvalidSignatureError,
    UnknownClient,
)
from secagg.ids import check_client_id, check_session_id, id_bytes

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _raw_public(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


_KDF_DOMAIN = b"fedsec/secagg/v1/pair-key"


class KeyPurpose:
    """Labels that separate the keys derived from one shared secret."""

    MASK = b"mask-prg"
    SHARE_ENCRYPTION = b"share-aead"


# --- Ed25519 identities ----------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """An institution's long-term Ed25519 signing key."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        if len(raw) != PRIVATE_KEY_BYTES:
            raise ConfigurationError(f"an Ed25519 private key is {PRIVATE_KEY_BYTES} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return _raw_private(self.private_key)

    @property
    def public_bytes(self) -> bytes:
        return _raw_public(self.private_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def verify_signature(public_key: bytes, signature: bytes, message: bytes, what: str) -> None:
    """Raise :class:`InvalidSignatureError` naming ``what`` unless the signature verifies."""
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidSignatureError(f"{what}: signature missing or not {SIGNATURE_BYTES} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        raise InvalidSignatureError(f"{what}: signature does not verify") from None


class Roster(Mapping[int, bytes]):
    """The institutions allowed in a federation: client id -> Ed25519 public key (32 bytes)."""

    def __init__(self, entries: Mapping[int, bytes]) -> None:
        checked: dict[int, bytes] = {}
        for client_id, key in entries.items():
            check_client_id(client_id)
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                raise ConfigurationError(
                    f"roster entry {client_id}: an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes"
                )
            Ed25519PublicKey.from_public_bytes(key)  # rejects malformed points early
            checked[client_id] = key
        if len(set(checked.values())) != len(checked):
            raise ConfigurationError("roster lists the same identity key under two client ids")
        self._entries = checked

    def __getitem__(self, client_id: int) -> bytes:
        return self._entries[client_id]  # KeyError, so ``id in roster`` works as for any Mapping

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, client_id: int, signature: bytes, message: bytes, what: str) -> None:
        key = self._entries.get(client_id)
        if key is None:
            raise UnknownClient(f"{what} from client {client_id}, who is not in the roster")
        verify_signature(key, signature, message, f"{what} from client {client_id}")


# --- X25519 ephemeral keys -------------------------------------------------------------------


@dataclass(frozen=True)
class AgreementKeyPair:
    """An X25519 key pair used for one session only."""

    private_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> AgreementKeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> AgreementKeyPair:
        if len(raw) != PRIVATE_KEY_BYTES:
            raise ConfigurationError(f"an X25519 private key is {PRIVATE_KEY_BYTES} bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return _raw_private(self.private_key)

    @property
    def public_bytes(self) -> bytes:
        return _raw_public(self.private_key)

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with ``peer_public``; a malformed or low-order key is :class:`InvalidPublicKey`
        (``cryptography`` refuses an all-zero shared secret with a bare ``ValueError``)."""
        if len(peer_public) != PUBLIC_KEY_BYTES:
            raise InvalidPublicKey(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes")
        try:
            return self.private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise InvalidPublicKey(
                "X25519 public key of low order: the shared secret would be all zeros"
            ) from None


def check_agreement_public_key(public: bytes, what: str) -> None:
    """Refuse an X25519 public key no honest party could have made (wrong length or low order),
    by an exchange with a throwaway key: low-order points give the all-zero secret for any."""
    try:
        AgreementKeyPair.generate().exchange(public)
    except InvalidPublicKey as exc:
        raise InvalidPublicKey(f"{what}: {exc}") from None


def derive_pair_key(
    shared_secret: bytes, session_id: bytes, purpose: bytes, u: int, v: int, length: int
) -> bytes:
    """HKDF-SHA256(salt=session_id, info=domain || purpose || min(u,v) || max(u,v)).

    Symmetric in (u, v) because both ends must derive the same key; the direction of a message
    is bound separately (AEAD associated data, mask sign).
    """
    check_session_id(session_id)
    if u == v:
        raise ConfigurationError("a pair key needs two distinct clients")
    lo, hi = sorted((u, v))
    info = _KDF_DOMAIN + b"|" + purpose + b"|" + id_bytes(lo) + id_bytes(hi)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=session_id, info=info)
    return hkdf.derive(shared_secret)


def random_seed(n_bytes: int = 32) -> bytes:
    """Secret randomness (self-mask seeds, session ids) from the OS CSPRNG."""
    return os.urandom(n_bytes)

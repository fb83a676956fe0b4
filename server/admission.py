"""Admission of institutions: TLS first, then proof of an Ed25519 identity in the roster.

TLS authenticates the server to the client. The client authenticates with a challenge-response
on top: the server hands out a fresh 32-byte nonce per request (single use, short-lived), the
client signs :func:`fl_core.wire.convert.admission_signed_bytes` (domain, nonce, SHA-256 of this
server's certificate, client id) and gets an opaque random token that names it on later calls.

Nonces are stateless: 8 random bytes, the expiry, and an HMAC-SHA256 tag under a per-process key
over (client id, random, expiry). Anyone who reaches the port may ask for challenges for any id
(the request is unauthenticated), but a challenge no longer replaces an earlier one, so nobody
can keep an institution out by asking for its challenges in a loop; a nonce is single use (the
server remembers those presented until they expire).
Binding the certificate hash means a signature a client gave to another server (one with a
different certificate) is useless here. Tokens live in memory only: after a server restart every
client re-authenticates, which is also how clients learn that their in-flight round is gone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

import grpc

from fl_core.wire.convert import NONCE_BYTES, admission_signed_bytes
from secagg.errors import InvalidSignatureError
from secagg.ids import id_bytes
from secagg.keys import Roster

TOKEN_BYTES = 32
_NONCE_DOMAIN = b"fedsec/server/v1/admission-nonce"
_RANDOM_BYTES, _EXPIRY_BYTES = 8, 8
_TAG_BYTES = NONCE_BYTES - _RANDOM_BYTES - _EXPIRY_BYTES


class Refusal(Exception):
    """A request refused with a gRPC status; ``str()`` is the reason logged and returned."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Admission:
    def __init__(self, roster: Roster, server_cert_sha256: bytes, nonce_ttl_s: float = 30.0):
        self._roster = roster
        # Membership via the id set: Roster.__getitem__ raises UnknownClient, not KeyError,
        # so the Mapping ``in`` operator would raise instead of answering False.
        self._ids = frozenset(roster)
        self._cert_sha256 = server_cert_sha256
        self._nonce_ttl_ns = int(nonce_ttl_s * 1e9)
        self._nonce_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._presented: dict[bytes, int] = {}  # nonce -> expiry (ns): each is used once
        self._tokens: dict[bytes, int] = {}

    def _known(self, client_id: int) -> None:
        if client_id not in self._ids:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in the roster"
            )

    def _tag(self, client_id: int, body: bytes) -> bytes:
        mac = hmac.new(self._nonce_key, _NONCE_DOMAIN + id_bytes(client_id) + body, hashlib.sha256)
        return mac.digest()[:_TAG_BYTES]

    def challenge(self, client_id: int) -> bytes:
        self._known(client_id)
        expires = time.monotonic_ns() + self._nonce_ttl_ns
        body = secrets.token_bytes(_RANDOM_BYTES) + expires.to_bytes(_EXPIRY_BYTES, "big")
        return body + self._tag(client_id, body)

    def authenticate(
        self, client_id: int, nonce: bytes, server_cert_sha256: bytes, signature: bytes
    ) -> bytes:
        self._known(client_id)
        body, tag = nonce[: NONCE_BYTES - _TAG_BYTES], nonce[NONCE_BYTES - _TAG_BYTES :]
        if len(nonce) != NONCE_BYTES or not hmac.compare_digest(tag, self._tag(client_id, body)):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED, f"client {client_id}: nonce was not issued to it"
            )
        expires = int.from_bytes(body[_RANDOM_BYTES:], "big")
        now = time.monotonic_ns()
        with self._lock:
            for old in [n for n, until in self._presented.items() if until < now]:
                del self._presented[old]
            used = nonce in self._presented
            self._presented[nonce] = expires  # single use, even when the attempt fails
        if used:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED, f"client {client_id}: nonce was already used"
            )
        if now > expires:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"client {client_id}: nonce expired")
        if not secrets.compare_digest(server_cert_sha256, self._cert_sha256):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client {client_id} signed for another server certificate",
            )
        try:
            self._roster.verify(
                client_id,
                signature,
                admission_signed_bytes(nonce, self._cert_sha256, client_id),
                "admission",
            )
        except InvalidSignatureError as exc:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            # A re-authenticating client (a restarted process) invalidates its old tokens.
            for old in [t for t, c in self._tokens.items() if c == client_id]:
                del self._tokens[old]
            self._tokens[token] = client_id
        return token

    def client_of(self, token: bytes) -> int:
        with self._lock:
            client_id = self._tokens.get(token)
        if client_id is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown or superseded session token")
        return client_id

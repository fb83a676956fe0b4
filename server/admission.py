"""Admission of institutions: TLS first, then proof of an Ed25519 identity in the roster.

TLS authenticates the server to the client. The client authenticates with a challenge-response
on top: the server hands out a fresh 32-byte nonce per request (single use, short-lived), the
client signs :func:`fl_core.wire.convert.admission_signed_bytes` (domain, nonce, SHA-256 of this
server's certificate, client id) and gets an opaque random token that names it on later calls.
Binding the certificate hash means a signature a client gave to another server (one with a
different certificate) is useless here. Tokens live in memory only: after a server restart every
client re-authenticates, which is also how clients learn that their in-flight round is gone.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import grpc

from fl_core.wire.convert import NONCE_BYTES, admission_signed_bytes
from secagg.errors import InvalidSignatureError
from secagg.keys import Roster

TOKEN_BYTES = 32


class Refusal(Exception):
    """A request refused with a gRPC status; ``str()`` is the reason logged and returned."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class _Nonce:
    value: bytes
    expires: float


class Admission:
    def __init__(self, roster: Roster, server_cert_sha256: bytes, nonce_ttl_s: float = 30.0):
        self._roster = roster
        # Membership via the id set: Roster.__getitem__ raises UnknownClient, not KeyError,
        # so the Mapping ``in`` operator would raise instead of answering False.
        self._ids = frozenset(roster)
        self._cert_sha256 = server_cert_sha256
        self._nonce_ttl_s = nonce_ttl_s
        self._lock = threading.Lock()
        self._nonces: dict[int, _Nonce] = {}
        self._tokens: dict[bytes, int] = {}

    def _known(self, client_id: int) -> None:
        if client_id not in self._ids:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in the roster"
            )

    def challenge(self, client_id: int) -> bytes:
        self._known(client_id)
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            # One outstanding nonce per id: a new challenge invalidates the previous one.
            self._nonces[client_id] = _Nonce(nonce, time.monotonic() + self._nonce_ttl_s)
        return nonce

    def authenticate(
        self, client_id: int, nonce: bytes, server_cert_sha256: bytes, signature: bytes
    ) -> bytes:
        self._known(client_id)
        with self._lock:
            issued = self._nonces.pop(client_id, None)  # single use, even when it fails
        if issued is None or not secrets.compare_digest(issued.value, nonce):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client {client_id}: nonce was not issued to it or was already used",
            )
        if time.monotonic() > issued.expires:
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

"""Admission of institutions: TLS first, then proof of an Ed25519 identity in the roster.

TLS authenticates the server to the client. The client authenticates with a challenge-response
on top: the server hands out a fresh 32-byte nonce per request (single use, short-lived), the
client signs :func:`wire.convert.admission_signed_bytes` (domain, nonce, SHA-256 of this
server's certificate, client id) and gets an opaque random token that names it on later calls.

Refusal codes tell a client what it can do about them: PERMISSION_DENIED is permanent (not in
the roster, a signature that does not verify, a signature for another server's certificate),
UNAUTHENTICATED is worth a fresh challenge (a nonce expired, was used, or a token is stale),
ALREADY_EXISTS means another process of the same institution is connected.

A second process of one institution (the same id started twice) would otherwise take over the
first one's token at every admission and each would lose its rounds to the other. Each client
process sends a random ``instance`` with its admission; while the current token of an id was
used within :data:`ACTIVE_WITHIN_S` (or a poll of that id is in flight) by another instance, a new
instance is refused. The same instance re-admitting (its token lost) is always let in.

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
from dataclasses import dataclass

import grpc

from secagg.errors import InvalidSignatureError
from secagg.ids import id_bytes
from secagg.keys import Roster
from wire.convert import NONCE_BYTES, admission_signed_bytes

TOKEN_BYTES = 32
#: A token used this recently belongs to a live client process (an idle client always has a
#: poll in flight; this covers the gaps between its calls).
ACTIVE_WITHIN_S = 5.0
_NONCE_DOMAIN = b"fedsec/server/v1/admission-nonce"
_RANDOM_BYTES, _EXPIRY_BYTES = 8, 8
_TAG_BYTES = NONCE_BYTES - _RANDOM_BYTES - _EXPIRY_BYTES


class Refusal(Exception):
    """A request refused with a gRPC status; ``str()`` is the reason logged and returned."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class _Session:
    client_id: int
    instance: bytes
    last_used: float


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
        self._tokens: dict[bytes, _Session] = {}

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
        self,
        client_id: int,
        nonce: bytes,
        server_cert_sha256: bytes,
        signature: bytes,
        instance: bytes = b"",
        polling: bool = False,
    ) -> bytes:
        """A token for ``client_id``; ``polling`` says a poll of that id is in flight."""
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
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client_id} signed for another server certificate (a TLS proxy in "
                "between, or another server's certificate)",
            )
        try:
            self._roster.verify(
                client_id,
                signature,
                admission_signed_bytes(nonce, self._cert_sha256, client_id),
                "admission",
            )
        except InvalidSignatureError as exc:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{exc} (is this the identity key the roster lists for client {client_id}?)",
            ) from None
        token = secrets.token_bytes(TOKEN_BYTES)
        now_s = time.monotonic()
        with self._lock:
            current = [t for t, s in self._tokens.items() if s.client_id == client_id]
            live = [
                self._tokens[t]
                for t in current
                if self._tokens[t].instance != instance
                and (polling or now_s - self._tokens[t].last_used <= ACTIVE_WITHIN_S)
            ]
            if live:
                raise Refusal(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"client {client_id} is already connected from another process (used "
                    f"{now_s - live[0].last_used:.0f} s ago): is this institution's client "
                    "running twice?",
                )
            # A re-authenticating client (a restarted process) invalidates its old tokens.
            for old in current:
                del self._tokens[old]
            self._tokens[token] = _Session(client_id, instance, now_s)
        return token

    def client_of(self, token: bytes) -> int:
        with self._lock:
            session = self._tokens.get(token)
            if session is not None:
                session.last_used = time.monotonic()
        if session is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown or superseded session token")
        return session.client_id

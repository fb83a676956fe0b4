"""CKKS key files of a deployment, and the three steps that make them (announce, deal, open).

Who holds what (see :mod:`secagg.he` for the trust model):

- The *key dealer* is an institution (in production never the coordinator, and never the CA
  that issued TLS certificates): it generates the federation's CKKS keys, seals the secret
  context to each institution and writes the *public context file* for the coordinator.
- Each institution announces an X25519 key signed with its Ed25519 identity, opens the sealed
  secret context (CKKS secret key and the federation's tag key, :mod:`secagg.he.keys`) addressed
  to it and stores it in its own directory, mode 0600.
- The coordinator only ever reads the public context file; it carries the dealer's signed
  announcement, so the coordinator (and anyone auditing it) checks against the roster that the
  context is the one a listed institution generated.

Files (all start with a 4-byte magic and a version byte, so a file handed to the wrong step
is refused by name rather than misparsed; the two that carry the secret are at version 2, which
added the tag key, so a key dealt before it is refused rather than used without one):

- public context ``FSHP`` (v1): dealer announcement | TenSEAL context without secret key.
- sealed context ``FSHS`` (v2): dealer announcement | recipient u32 | CKKS shape | AEAD blob of
  (fingerprint | tag key | secret context).
- secret context ``FSHK`` (v2): fingerprint | tag key | CKKS shape | TenSEAL context with the
  secret key.
- agreement key ``FSHA``: key-distribution session id | X25519 private key (deleted on open).
- announcement ``FSHN``: one institution's :class:`KeyAnnouncement`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts

from fl_core.toml_config import ConfigError
from secagg.errors import SecAggError
from secagg.he import (
    CKKSParams,
    KeyAnnouncement,
    PublicContext,
    SecretContext,
    generate_federation_keys,
    open_secret_context,
    seal_secret_context,
)
from secagg.he.keys import TAG_KEY_BYTES
from secagg.keys import AgreementKeyPair, Identity, Roster
from wire.credentials import _write_private

_VERSION = 1
#: Kinds whose layout changed: the secret-bearing files gained the tag key in version 2.
_VERSIONS = {b"FSHS": 2, b"FSHK": 2}
_ANNOUNCEMENT = struct.Struct(">32sI32s32s64s")
_SESSION_BYTES = 32
_FINGERPRINT_BYTES = 32


class KeyFileError(ConfigError):
    """A CKKS key file that is missing, of another kind, malformed, or not for this party."""


@dataclass(frozen=True)
class CkksShape:
    """The parameters a CKKS key depends on. Clip, cohort size and weighting are per round and
    do not change the key, so one federation key serves every round that keeps this shape."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40

    @classmethod
    def of(cls, params: CKKSParams) -> CkksShape:
        return cls(params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.scale_bits)

    def key_params(self) -> CKKSParams:
        """Parameters to generate or open a key of this shape. The round-level fields take
        their smallest valid values: the key is the same whatever they are."""
        return CKKSParams(
            clip=1.0,
            max_clients=2,
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            scale_bits=self.scale_bits,
        )

    def to_bytes(self) -> bytes:
        sizes = self.coeff_mod_bit_sizes
        return struct.pack(
            f">IB{len(sizes)}BB", self.poly_modulus_degree, len(sizes), *sizes, self.scale_bits
        )

    @classmethod
    def from_bytes(cls, data: bytes, offset: int, where: Path) -> tuple[CkksShape, int]:
        try:
            degree, count = struct.unpack_from(">IB", data, offset)
            offset += 5
            sizes = struct.unpack_from(f">{count}B", data, offset)
            offset += count
            (scale_bits,) = struct.unpack_from(">B", data, offset)
        except struct.error:
            raise KeyFileError(f"{where}: truncated CKKS parameters") from None
        return cls(degree, tuple(sizes), scale_bits), offset + 1


# --- encodings -----------------------------------------------------------------------------


def _header(magic: bytes) -> bytes:
    return magic + bytes([_VERSIONS.get(magic, _VERSION)])


def _body(data: bytes, magic: bytes, where: Path, what: str) -> bytes:
    version = _VERSIONS.get(magic, _VERSION)
    if data[:4] != magic or data[4:5] != bytes([version]):
        raise KeyFileError(f"{where}: not a version-{version} fedsec {what} file")
    return data[5:]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {what} file") from None


def _write_new(path: Path, data: bytes, what: str) -> None:
    if path.exists():
        raise KeyFileError(f"{path} exists; refusing to overwrite a {what}")
    _write_private(path, data)


def encode_announcement(announcement: KeyAnnouncement) -> bytes:
    return _ANNOUNCEMENT.pack(
        announcement.session_id,
        announcement.client_id,
        announcement.agreement_public,
        announcement.fingerprint,
        announcement.signature,
    )


def decode_announcement(data: bytes, where: Path) -> KeyAnnouncement:
    if len(data) < _ANNOUNCEMENT.size:
        raise KeyFileError(f"{where}: truncated key announcement")
    return KeyAnnouncement(*_ANNOUNCEMENT.unpack_from(data))


def write_announcement(announcement: KeyAnnouncement, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_header(b"FSHN") + encode_announcement(announcement))


def read_announcement(path: Path) -> KeyAnnouncement:
    body = _body(_read(path, "key announcement"), b"FSHN", path, "key announcement")
    if len(body) != _ANNOUNCEMENT.size:
        raise KeyFileError(f"{path}: a key announcement is {_ANNOUNCEMENT.size} bytes")
    return decode_announcement(body, path)


# --- the three steps -----------------------------------------------------------------------


def announce(
    identity: Identity, client_id: int, session_id: bytes
) -> tuple[AgreementKeyPair, KeyAnnouncement]:
    """An institution's fresh X25519 key for one key distribution, signed with its identity."""
    agreement = AgreementKeyPair.generate()
    return agreement, KeyAnnouncement.create(identity, session_id, client_id, agreement)


def save_agreement_key(agreement: AgreementKeyPair, session_id: bytes, path: Path) -> None:
    _write_new(path, _header(b"FSHA") + session_id + agreement.private_bytes(), "agreement key")


def load_agreement_key(path: Path) -> tuple[AgreementKeyPair, bytes]:
    """The agreement key saved by ``announce`` and the session it was announced for."""
    body = _body(_read(path, "agreement key"), b"FSHA", path, "agreement key")
    if len(body) != _SESSION_BYTES + 32:
        raise KeyFileError(f"{path}: an agreement key file holds a session id and 32 bytes")
    return AgreementKeyPair.from_private_bytes(body[_SESSION_BYTES:]), body[:_SESSION_BYTES]


@dataclass(frozen=True)
class Dealt:
    """What the dealer produces: its own secret context, the public context file's bytes for
    the coordinator, and one sealed file's bytes per recipient institution."""

    secret: SecretContext
    public_file: bytes
    sealed_files: dict[int, bytes]


def deal(
    identity: Identity,
    dealer_id: int,
    session_id: bytes,
    shape: CkksShape,
    recipients: Iterable[KeyAnnouncement],
    roster: Roster,
) -> Dealt:
    """Run by the key dealer (an institution): generate the federation keys and seal the
    secret context to every recipient whose announcement verifies against the roster."""
    keys = generate_federation_keys(shape.key_params())
    agreement = AgreementKeyPair.generate()
    own = KeyAnnouncement.create(identity, session_id, dealer_id, agreement, keys.fingerprint)
    sealed: dict[int, bytes] = {}
    for recipient in recipients:
        if recipient.client_id == dealer_id or recipient.client_id in sealed:
            raise ConfigError(f"client {recipient.client_id} is announced twice (or is the dealer)")
        blob = seal_secret_context(keys, agreement, own, recipient, roster)
        sealed[recipient.client_id] = (
            _header(b"FSHS")
            + encode_announcement(own)
            + struct.pack(">I", recipient.client_id)
            + shape.to_bytes()
            + blob
        )
    public_file = _header(b"FSHP") + encode_announcement(own) + keys.public.to_bytes()
    return Dealt(keys.secret, public_file, sealed)


def open_sealed(
    data: bytes,
    agreement: AgreementKeyPair,
    session_id: bytes,
    own_id: int,
    roster: Roster,
    where: Path,
) -> SecretContext:
    """A recipient opens the sealed file the dealer addressed to it (signature, AEAD binding
    to session, dealer and recipient, and the signed fingerprint are all checked)."""
    body = _body(data, b"FSHS", where, "sealed secret context")
    dealer = decode_announcement(body, where)
    if dealer.session_id != session_id:
        raise KeyFileError(
            f"{where}: sealed in key distribution {dealer.session_id[:8].hex()}…, this "
            f"institution announced its key for {session_id[:8].hex()}…"
        )
    offset = _ANNOUNCEMENT.size
    if len(body) < offset + 4:
        raise KeyFileError(f"{where}: truncated sealed secret context")
    (recipient,) = struct.unpack_from(">I", body, offset)
    if recipient != own_id:
        raise KeyFileError(f"{where}: sealed for client {recipient}, this is client {own_id}")
    shape, offset = CkksShape.from_bytes(body, offset + 4, where)
    try:
        return open_secret_context(
            body[offset:], agreement, own_id, dealer, roster, shape.key_params()
        )
    except SecAggError as exc:
        raise KeyFileError(f"{where}: cannot open: {type(exc).__name__}: {exc}") from None


# --- the files each party keeps ------------------------------------------------------------


def save_secret_context(secret: SecretContext, path: Path) -> None:
    """Store an institution's secret context and tag key, owner-readable only; never
    overwrites."""
    context = secret.context.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    data = (
        _header(b"FSHK")
        + secret.fingerprint
        + secret.tag_key
        + CkksShape.of(secret.params).to_bytes()
    )
    _write_new(path, data + bytes(context), "secret context")


@dataclass(frozen=True)
class HeldSecret:
    """An institution's stored secret context, before a round fixes the per-round fields."""

    context: ts.Context
    fingerprint: bytes
    tag_key: bytes
    shape: CkksShape

    def for_round(self, params: CKKSParams) -> SecretContext:
        """The secret context under a round's parameters; refuses a round of another shape."""
        if CkksShape.of(params) != self.shape:
            raise ConfigError(
                f"the round's CKKS parameters {CkksShape.of(params)} are not those of this "
                f"institution's key {self.shape}"
            )
        return SecretContext(self.context, params, self.fingerprint, self.tag_key)


def load_secret_context(path: Path) -> HeldSecret:
    body = _body(_read(path, "secret context"), b"FSHK", path, "secret context")
    fingerprint = body[:_FINGERPRINT_BYTES]
    tag_key = body[_FINGERPRINT_BYTES : _FINGERPRINT_BYTES + TAG_KEY_BYTES]
    if len(tag_key) != TAG_KEY_BYTES:
        raise KeyFileError(f"{path}: truncated secret context")
    shape, offset = CkksShape.from_bytes(body, _FINGERPRINT_BYTES + TAG_KEY_BYTES, path)
    try:
        context = ts.context_from(body[offset:])
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a TenSEAL context: {exc}") from None
    if not context.is_private() or context.global_scale != float(2**shape.scale_bits):
        raise KeyFileError(f"{path}: does not hold a secret key at scale 2^{shape.scale_bits}")
    return HeldSecret(context, fingerprint, tag_key, shape)


def write_public_context(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise KeyFileError(f"{path} exists; refusing to overwrite a public context")
    path.write_bytes(data)


def load_public_context(path: Path, params: CKKSParams, roster: Roster) -> PublicContext:
    """The coordinator's public context: the dealer's announcement must verify against the
    roster, the context must hash to the fingerprint it signed, hold no secret key and have
    the configured parameters."""
    body = _body(_read(path, "public context"), b"FSHP", path, "public context")
    dealer = decode_announcement(body, path)
    try:
        dealer.verify(roster, dealer.session_id)
        return PublicContext.from_bytes(
            body[_ANNOUNCEMENT.size :], params, expected_fingerprint=dealer.fingerprint
        )
    except SecAggError as exc:
        raise KeyFileError(f"{path}: {type(exc).__name__}: {exc}") from None


def new_session_id() -> bytes:
    """A fresh key-distribution session id (every announcement and seal is bound to it)."""
    return os.urandom(_SESSION_BYTES)

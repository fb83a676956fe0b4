"""Typed protocol messages and their canonical, versioned byte encoding.

Every message starts with the same header: magic ``FSA``, format version, message type,
the 32-byte session id, sender and recipient (client ids; 0 is the server). Fields follow in a
fixed order; variable-length fields carry a 4-byte length and lists a 4-byte count, and every
length is checked against the bytes actually present *before* anything is allocated, so a
malformed or hostile message is a :class:`MessageFormatError`, never an exception from deep
inside numpy or a huge allocation. Decoding is strict: trailing bytes, unknown types, an
unsupported version, non-canonical list order and duplicate ids are all refused, so that one
message has exactly one encoding (the transcript's digests rely on that).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

from secagg.errors import MessageFormatError
from secagg.ids import check_session_id

MAGIC = b"FSA"
VERSION = 2  # 2: SecAgg+ graph-seed commitments and reveals
SERVER = 0
_HEAD = struct.Struct(">3sBB32s")  # magic, version, type, session; sender/recipient follow
_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")

X25519_PUBLIC_BYTES = 32
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
SHARE_BYTES = 33
SEED_REVEAL_BYTES = 32
#: Upper bound on any single variable-length field (a packed 64-bit vector of 2^27 elements).
MAX_FIELD_BYTES = 1 << 30


# --- client -> server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedCommit:
    """SecAgg+ only: u's commitment to its share of the graph seed (sent before any reveal)."""

    session_id: bytes
    sender: int
    commitment: bytes  # seed_commitment(session, u, reveal)
    recipient: int = SERVER


@dataclass(frozen=True)
class AdvertiseKeys:
    session_id: bytes
    sender: int
    encryption_public: bytes  # c_u
    masking_public: bytes  # s_u
    context_digest: bytes  # hash of the round config and global model this client received
    signature: bytes  # Ed25519 over advert_signed_bytes(...)
    seed_reveal: bytes = b""  # SecAgg+: the committed graph-seed share (empty: complete graph)
    recipient: int = SERVER


@dataclass(frozen=True)
class ShareKeys:
    session_id: bytes
    sender: int
    self_mask_commitment: bytes  # SHA-256 commitment to b_u
    ciphertexts: tuple[tuple[int, bytes], ...]  # (neighbour v, AEAD(shares for v)), sorted by v
    recipient: int = SERVER


@dataclass(frozen=True)
class MaskedInput:
    session_id: bytes
    sender: int
    payload: bytes  # the b-bit packed masked vector
    recipient: int = SERVER


@dataclass(frozen=True)
class ConsistencySignature:
    session_id: bytes
    sender: int
    signature: bytes  # Ed25519 over consistency_signed_bytes(...)
    recipient: int = SERVER


@dataclass(frozen=True)
class UnmaskResponse:
    session_id: bytes
    sender: int
    self_mask_shares: tuple[tuple[int, bytes], ...]  # (owner v, share of b_v), sorted by v
    key_shares: tuple[tuple[int, bytes], ...]  # (owner v, share of s_v^SK), sorted by v
    recipient: int = SERVER


# --- server -> client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedCommitments:
    """SecAgg+ only: every graph-seed commitment the server received, sorted by client id."""

    session_id: bytes
    recipient: int
    commitments: tuple[tuple[int, bytes], ...]
    sender: int = SERVER


@dataclass(frozen=True)
class PeerAdvert:
    client_id: int
    encryption_public: bytes
    masking_public: bytes
    context_digest: bytes
    signature: bytes


@dataclass(frozen=True)
class KeysBroadcast:
    session_id: bytes
    recipient: int
    adverts: tuple[PeerAdvert, ...]  # the recipient's neighbours that advertised, sorted by id
    seed_reveals: tuple[tuple[int, bytes], ...] = ()  # SecAgg+: every committed client's reveal
    sender: int = SERVER


@dataclass(frozen=True)
class SharesDelivery:
    session_id: bytes
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]  # (sending neighbour v, ciphertext), sorted by v
    sender: int = SERVER


@dataclass(frozen=True)
class ConsistencyRequest:
    session_id: bytes
    recipient: int
    survivors: tuple[int, ...]  # U3: the clients whose masked input the server holds, sorted
    sender: int = SERVER


@dataclass(frozen=True)
class UnmaskRequest:
    session_id: bytes
    recipient: int
    survivors: tuple[int, ...]  # U3 again: the set the signatures are over
    signatures: tuple[tuple[int, bytes], ...]  # consistency signatures of neighbours in U3
    reveal_self_mask_for: tuple[int, ...]  # neighbours whose b_v share the server wants
    reveal_key_for: tuple[int, ...]  # neighbours whose s_v^SK share the server wants
    sender: int = SERVER


ClientMessage = (
    SeedCommit | AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskResponse
)
ServerMessage = (
    SeedCommitments | KeysBroadcast | SharesDelivery | ConsistencyRequest | UnmaskRequest
)
#: The message types of each direction, for dispatch and for refusing the wrong direction.
CLIENT_MESSAGE_TYPES = (
    SeedCommit,
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    ConsistencySignature,
    UnmaskResponse,
)
SERVER_MESSAGE_TYPES = (
    SeedCommitments,
    KeysBroadcast,
    SharesDelivery,
    ConsistencyRequest,
    UnmaskRequest,
)
Message = ClientMessage | ServerMessage


# --- encoding -----------------------------------------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def fixed(self, value: bytes, size: int, what: str) -> None:
        if len(value) != size:
            raise MessageFormatError(f"{what} must be {size} bytes, got {len(value)}")
        self.parts.append(value)

    def u32(self, value: int, what: str) -> None:
        if not 0 <= value < 1 << 32:
            raise MessageFormatError(f"{what} {value} does not fit in 32 bits")
        self.parts.append(_U32.pack(value))

    def blob(self, value: bytes, what: str) -> None:
        if len(value) > MAX_FIELD_BYTES:
            raise MessageFormatError(f"{what} is larger than {MAX_FIELD_BYTES} bytes")
        self.u32(len(value), what)
        self.parts.append(bytes(value))

    def ids(self, values: tuple[int, ...], what: str) -> None:
        _check_sorted_unique(values, what)
        self.u32(len(values), what)
        if values and not 0 <= values[0] <= values[-1] < 1 << 32:  # sorted: the ends bound all
            raise MessageFormatError(f"{what}: ids must fit in 32 bits")
        self.parts.append(struct.pack(f">{len(values)}I", *values))  # one pack: lists are O(n)

    def id_blobs(self, pairs: tuple[tuple[int, bytes], ...], what: str, size: int = 0) -> None:
        _check_sorted_unique(tuple(v for v, _ in pairs), what)
        self.u32(len(pairs), what)
        for v, blob in pairs:
            self.u32(v, what)
            if size:
                self.fixed(blob, size, what)
            else:
                self.blob(blob, what)


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data = memoryview(data)
        self.offset = offset

    def _take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise MessageFormatError(f"message truncated while reading {what}")
        out = bytes(self.data[self.offset : end])
        self.offset = end
        return out

    def fixed(self, size: int, what: str) -> bytes:
        return self._take(size, what)

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self._take(4, what))[0]
        return value

    def blob(self, what: str) -> bytes:
        size = self.u32(what)
        if size > MAX_FIELD_BYTES:
            raise MessageFormatError(f"{what} declares {size} bytes, above the limit")
        return self._take(size, what)

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.u32(what)
        if n * min_item_bytes > len(self.data) - self.offset:
            raise MessageFormatError(f"{what} declares {n} items but the message is too short")
        return n

    def ids(self, what: str) -> tuple[int, ...]:
        n = self.count(what, 4)  # checks that the 4n bytes are there
        values: tuple[int, ...] = struct.unpack_from(f">{n}I", self.data, self.offset)
        self.offset += 4 * n
        _check_sorted_unique(values, what)
        return values

    def id_blobs(self, what: str, size: int = 0) -> tuple[tuple[int, bytes], ...]:
        # The per-item reads of u32/fixed/blob, inlined: these lists are O(n) long.
        n = self.count(what, 4 + (size or 4))
        data, offset, end = self.data, self.offset, len(self.data)
        head = _U32 if size else _U32X2  # id, or id and length
        pairs = []
        for _ in range(n):
            if offset + head.size > end:
                raise MessageFormatError(f"message truncated while reading {what}")
            if size:
                v, length = _U32.unpack_from(data, offset)[0], size
            else:
                v, length = _U32X2.unpack_from(data, offset)
                if length > MAX_FIELD_BYTES:
                    raise MessageFormatError(f"{what} declares {length} bytes, above the limit")
            offset += head.size
            if offset + length > end:
                raise MessageFormatError(f"message truncated while reading {what}")
            pairs.append((v, bytes(data[offset : offset + length])))
            offset += length
        self.offset = offset
        out = tuple(pairs)
        _check_sorted_unique(tuple(v for v, _ in out), what)
        return out

    def end(self) -> None:
        if self.offset != len(self.data):
            raise MessageFormatError(f"{len(self.data) - self.offset} trailing bytes")


def _check_sorted_unique(values: tuple[int, ...], what: str) -> None:
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise MessageFormatError(f"{what} must list distinct ids in increasing order")


_TYPE_CODES: dict[type, int] = {
    SeedCommit: 6,
    SeedCommitments: 15,
    AdvertiseKeys: 1,
    ShareKeys: 2,
    MaskedInput: 3,
    ConsistencySignature: 4,
    UnmaskResponse: 5,
    KeysBroadcast: 11,
    SharesDelivery: 12,
    ConsistencyRequest: 13,
    UnmaskRequest: 14,
}


def encode_message(msg: Message) -> bytes:
    w = _Writer()
    code = _TYPE_CODES[type(msg)]
    w.parts.append(_HEAD.pack(MAGIC, VERSION, code, check_session_id(msg.session_id)))
    w.u32(msg.sender, "sender")
    w.u32(msg.recipient, "recipient")
    match msg:
        case SeedCommit():
            w.fixed(msg.commitment, DIGEST_BYTES, "seed commitment")
        case SeedCommitments():
            w.id_blobs(msg.commitments, "seed commitments", DIGEST_BYTES)
        case AdvertiseKeys():
            w.fixed(msg.encryption_public, X25519_PUBLIC_BYTES, "encryption public key")
            w.fixed(msg.masking_public, X25519_PUBLIC_BYTES, "masking public key")
            w.fixed(msg.context_digest, DIGEST_BYTES, "context digest")
            w.fixed(msg.signature, SIGNATURE_BYTES, "signature")
            if msg.seed_reveal and len(msg.seed_reveal) != SEED_REVEAL_BYTES:
                raise MessageFormatError(f"seed reveal must be empty or {SEED_REVEAL_BYTES} bytes")
            w.blob(msg.seed_reveal, "seed reveal")
        case ShareKeys():
            w.fixed(msg.self_mask_commitment, DIGEST_BYTES, "commitment")
            w.id_blobs(msg.ciphertexts, "share ciphertexts")
        case MaskedInput():
            w.blob(msg.payload, "masked input")
        case ConsistencySignature():
            w.fixed(msg.signature, SIGNATURE_BYTES, "signature")
        case UnmaskResponse():
            w.id_blobs(msg.self_mask_shares, "self-mask shares", SHARE_BYTES)
            w.id_blobs(msg.key_shares, "key shares", SHARE_BYTES)
        case KeysBroadcast():
            _check_sorted_unique(tuple(a.client_id for a in msg.adverts), "adverts")
            w.u32(len(msg.adverts), "adverts")
            for a in msg.adverts:
                w.u32(a.client_id, "advert id")
                w.fixed(a.encryption_public, X25519_PUBLIC_BYTES, "encryption public key")
                w.fixed(a.masking_public, X25519_PUBLIC_BYTES, "masking public key")
                w.fixed(a.context_digest, DIGEST_BYTES, "context digest")
                w.fixed(a.signature, SIGNATURE_BYTES, "signature")
            w.id_blobs(msg.seed_reveals, "seed reveals", SEED_REVEAL_BYTES)
        case SharesDelivery():
            w.id_blobs(msg.ciphertexts, "share ciphertexts")
        case ConsistencyRequest():
            w.ids(msg.survivors, "survivors")
        case UnmaskRequest():
            w.ids(msg.survivors, "survivors")
            w.id_blobs(msg.signatures, "signatures", SIGNATURE_BYTES)
            w.ids(msg.reveal_self_mask_for, "self-mask request")
            w.ids(msg.reveal_key_for, "key request")
    return b"".join(w.parts)


def _decode_advertise(r: _Reader, sid: bytes, sender: int, recipient: int) -> Message:
    encryption = r.fixed(X25519_PUBLIC_BYTES, "encryption public key")
    masking = r.fixed(X25519_PUBLIC_BYTES, "masking public key")
    digest = r.fixed(DIGEST_BYTES, "context digest")
    signature = r.fixed(SIGNATURE_BYTES, "signature")
    reveal = r.blob("seed reveal")
    if reveal and len(reveal) != SEED_REVEAL_BYTES:
        raise MessageFormatError(f"seed reveal must be empty or {SEED_REVEAL_BYTES} bytes")
    return AdvertiseKeys(sid, sender, encryption, masking, digest, signature, reveal, recipient)


def _decode_broadcast(r: _Reader, sid: bytes, sender: int, recipient: int) -> Message:
    n = r.count("adverts", 4 + 2 * X25519_PUBLIC_BYTES + DIGEST_BYTES + SIGNATURE_BYTES)
    adverts = tuple(
        PeerAdvert(
            r.u32("advert id"),
            r.fixed(X25519_PUBLIC_BYTES, "encryption public key"),
            r.fixed(X25519_PUBLIC_BYTES, "masking public key"),
            r.fixed(DIGEST_BYTES, "context digest"),
            r.fixed(SIGNATURE_BYTES, "signature"),
        )
        for _ in range(n)
    )
    _check_sorted_unique(tuple(a.client_id for a in adverts), "adverts")
    reveals = r.id_blobs("seed reveals", SEED_REVEAL_BYTES)
    return KeysBroadcast(sid, recipient, adverts, reveals, sender)


_Decoder = Callable[[_Reader, bytes, int, int], Message]
_DECODERS: dict[int, _Decoder] = {
    6: lambda r, sid, s, t: SeedCommit(sid, s, r.fixed(DIGEST_BYTES, "seed commitment"), t),
    15: lambda r, sid, s, t: SeedCommitments(
        sid, t, r.id_blobs("seed commitments", DIGEST_BYTES), s
    ),
    1: _decode_advertise,
    2: lambda r, sid, s, t: ShareKeys(
        sid, s, r.fixed(DIGEST_BYTES, "commitment"), r.id_blobs("share ciphertexts"), t
    ),
    3: lambda r, sid, s, t: MaskedInput(sid, s, r.blob("masked input"), t),
    4: lambda r, sid, s, t: ConsistencySignature(sid, s, r.fixed(SIGNATURE_BYTES, "signature"), t),
    5: lambda r, sid, s, t: UnmaskResponse(
        sid,
        s,
        r.id_blobs("self-mask shares", SHARE_BYTES),
        r.id_blobs("key shares", SHARE_BYTES),
        t,
    ),
    11: _decode_broadcast,
    12: lambda r, sid, s, t: SharesDelivery(sid, t, r.id_blobs("share ciphertexts"), s),
    13: lambda r, sid, s, t: ConsistencyRequest(sid, t, r.ids("survivors"), s),
    14: lambda r, sid, s, t: UnmaskRequest(
        sid,
        t,
        r.ids("survivors"),
        r.id_blobs("signatures", SIGNATURE_BYTES),
        r.ids("self-mask request"),
        r.ids("key request"),
        s,
    ),
}


def decode_message(data: bytes) -> Message:
    """Parse canonical bytes; raises :class:`MessageFormatError` on anything malformed."""
    if len(data) < _HEAD.size + 8:
        raise MessageFormatError(f"message of {len(data)} bytes is shorter than a header")
    magic, version, code, session_id = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise MessageFormatError("not a fedsec secure-aggregation message (bad magic)")
    if version != VERSION:
        raise MessageFormatError(f"unsupported message version {version} (expected {VERSION})")
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise MessageFormatError(f"unknown message type {code}")
    r = _Reader(data, _HEAD.size)
    sender, recipient = r.u32("sender"), r.u32("recipient")
    msg = decoder(r, session_id, sender, recipient)
    r.end()
    return msg


def message_kind(msg: Message) -> str:
    return type(msg).__name__

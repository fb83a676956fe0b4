"""CKKS primitives under the sessions of :mod:`secagg.he.session`: envelopes, slot layout,
encryption, decryption and the server's addition. Bytes in, bytes out.

- Slot layout: an update of d' = d (+1 weight slot when weighted) values fills the first
  ``params.data_slots`` slots of ceil(d' / data_slots) ciphertexts in order; every other slot
  (the last :data:`~secagg.he.params.TAG_SLOTS` of each ciphertext and the unused tail of the
  last one) carries no data. The sessions add an integrity pad to *every* slot.
- :class:`HEAggregator` (the server, holding only the public context) checks each envelope
  completely (session, fingerprint, sender, dimension, chunk count, every ciphertext parses under
  the federation's parameters at the round's scale) *before* adding it, so a bad upload is
  discarded and never corrupts the running sum; a client that never uploads is simply not in it.

Envelope (big-endian): ``b"FSHE" | version u8 | kind u8 | session_id 32 | fingerprint 32 |
encoded_dim u32 | ids u32 | ids × u32 | chunks u32 | chunks × length u32 | ciphertexts``. An
update names its sender as its one id; an aggregate names the contributors the server claims it
summed, in increasing order. Lengths are checked against the round's parameters before anything
is allocated or parsed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import tenseal as ts

from secagg.errors import (
    ConfigurationError,
    DuplicateClient,
    EncodingError,
    SessionMismatch,
    TooFewSurvivors,
)
from secagg.he.errors import CiphertextFormatError, ContextMismatch
from secagg.he.keys import PublicContext, SecretContext
from secagg.he.params import CKKSParams
from secagg.ids import check_client_id, check_session_id

FloatArray = npt.NDArray[np.float32]

MAGIC = b"FSHE"
VERSION = 2
KIND_UPDATE = 1
KIND_AGGREGATE = 2
_HEADER = struct.Struct(">4sBB32s32sII")
_U32 = struct.Struct(">I")
#: Slack over the raw ciphertext size for TenSEAL's and SEAL's serialization headers.
_SERIALIZATION_SLACK = 4096


@dataclass(frozen=True)
class Envelope:
    kind: int
    session_id: bytes
    fingerprint: bytes
    encoded_dim: int
    ids: tuple[int, ...]
    chunks: tuple[bytes, ...]


def _max_ciphertext_bytes(params: CKKSParams) -> int:
    # Two polynomials of N coefficients per data prime, 8 bytes each, before compression.
    primes = len(params.coeff_mod_bit_sizes) - 1
    return 2 * params.poly_modulus_degree * primes * 8 + _SERIALIZATION_SLACK


def pack(envelope: Envelope) -> bytes:
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        envelope.kind,
        envelope.session_id,
        envelope.fingerprint,
        envelope.encoded_dim,
        len(envelope.ids),
    )
    ids = b"".join(_U32.pack(u) for u in envelope.ids)
    lengths = b"".join(_U32.pack(len(chunk)) for chunk in envelope.chunks)
    return b"".join((header, ids, _U32.pack(len(envelope.chunks)), lengths, *envelope.chunks))


def unpack(
    data: bytes, params: CKKSParams, kind: int, session_id: bytes, dim: int, max_ids: int
) -> Envelope:
    """Parse and check an envelope's framing; the ciphertexts themselves are parsed later."""
    if not isinstance(data, bytes) or len(data) < _HEADER.size:
        raise CiphertextFormatError("encrypted message is truncated (shorter than its header)")
    magic, version, got_kind, got_session, fingerprint, encoded_dim, id_count = _HEADER.unpack_from(
        data
    )
    if magic != MAGIC or version != VERSION:
        raise CiphertextFormatError(f"not a version-{VERSION} fedsec CKKS message")
    if got_kind != kind:
        raise CiphertextFormatError(f"expected message kind {kind}, got {got_kind}")
    if got_session != session_id:
        raise SessionMismatch("encrypted message belongs to another session")
    if encoded_dim != params.encoded_dim(dim):
        raise CiphertextFormatError(
            f"message encodes {encoded_dim} values, this round expects {params.encoded_dim(dim)}"
        )
    if not 1 <= id_count <= max_ids:
        raise CiphertextFormatError(f"message names {id_count} clients, at most {max_ids} allowed")
    offset = _HEADER.size
    if len(data) < offset + (id_count + 1) * _U32.size:
        raise CiphertextFormatError("encrypted message is truncated (client ids)")
    ids = tuple(_U32.unpack_from(data, offset + i * _U32.size)[0] for i in range(id_count))
    offset += id_count * _U32.size
    (count,) = _U32.unpack_from(data, offset)
    offset += _U32.size
    if count != params.chunk_count(dim):
        raise CiphertextFormatError(
            f"message has {count} ciphertexts, this round expects {params.chunk_count(dim)}"
        )
    if len(data) < offset + count * _U32.size:
        raise CiphertextFormatError("encrypted message is truncated (length table)")
    lengths = [_U32.unpack_from(data, offset + i * _U32.size)[0] for i in range(count)]
    offset += count * _U32.size
    limit = _max_ciphertext_bytes(params)
    if any(length == 0 or length > limit for length in lengths):
        raise CiphertextFormatError(f"a ciphertext length is 0 or above {limit} bytes")
    if len(data) != offset + sum(lengths):
        raise CiphertextFormatError("encrypted message length does not match its length table")
    chunks = []
    for length in lengths:
        chunks.append(data[offset : offset + length])
        offset += length
    return Envelope(got_kind, got_session, fingerprint, encoded_dim, ids, tuple(chunks))


def load_chunks(envelope: Envelope, context: ts.Context, params: CKKSParams) -> list[ts.CKKSVector]:
    """Deserialize every ciphertext against ``context``; check slot counts and the scale."""
    vectors = []
    for index, chunk in enumerate(envelope.chunks):
        try:
            vector = ts.ckks_vector_from(context, chunk)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CiphertextFormatError(
                f"ciphertext {index} is not a CKKS ciphertext under this round's parameters: {exc}"
            ) from None
        if vector.size() != params.slots:
            raise CiphertextFormatError(
                f"ciphertext {index} holds {vector.size()} values, expected {params.slots}"
            )
        # A ciphertext at another scale or level would make add_ fail half-way through an
        # upload; a transparent one (zero mask) would carry no encryption at all.
        (raw,) = vector.ciphertext()
        if (
            raw.scale != params.scale
            or raw.size() != 2
            or raw.coeff_modulus_size() != len(params.coeff_mod_bit_sizes) - 1
            or raw.is_transparent()
        ):
            raise CiphertextFormatError(
                f"ciphertext {index} is not a fresh ciphertext at scale 2^{params.scale_bits} "
                "and the top level of this round's modulus"
            )
        vectors.append(vector)
    return vectors


# --- slot layout ----------------------------------------------------------------------------


def to_slots(values: npt.NDArray[np.float64], params: CKKSParams, dim: int) -> np.ndarray:
    """The (chunks, slots) float64 plaintext of ``values`` (``encoded_dim(dim)`` of them): data in
    the first ``data_slots`` slots of each row, zeros elsewhere."""
    chunks = params.chunk_count(dim)
    data = np.zeros(chunks * params.data_slots, dtype=np.float64)
    data[: values.size] = values
    plain = np.zeros((chunks, params.slots), dtype=np.float64)
    plain[:, : params.data_slots] = data.reshape(chunks, params.data_slots)
    return plain


def data_mask(params: CKKSParams, dim: int) -> npt.NDArray[np.bool_]:
    """True where :func:`to_slots` puts a value; False in the slots that carry no data."""
    chunks = params.chunk_count(dim)
    flat = np.zeros(chunks * params.data_slots, dtype=bool)
    flat[: params.encoded_dim(dim)] = True
    mask = np.zeros((chunks, params.slots), dtype=bool)
    mask[:, : params.data_slots] = flat.reshape(chunks, params.data_slots)
    return mask


def from_slots(plain: np.ndarray, params: CKKSParams, dim: int) -> npt.NDArray[np.float64]:
    """Inverse of :func:`to_slots`: the ``encoded_dim(dim)`` values, in order."""
    return np.asarray(plain[:, : params.data_slots].reshape(-1)[: params.encoded_dim(dim)])


def encrypt_rows(secret: SecretContext, plain: np.ndarray) -> tuple[bytes, ...]:
    """One ciphertext per row of ``plain`` under the secret context.

    TenSEAL takes only Python lists. ts.ckks_vector() turns the list into a numpy array and back
    into a list before calling the C++ constructor; calling that constructor directly (the same
    one, same arguments) saves ~30% of the client's time at d = 1M. One tolist() per ciphertext
    keeps peak memory at one chunk of Python floats.
    """
    context = secret.context.data
    return tuple(bytes(ts._ts_cpp.CKKSVector(context, row.tolist()).serialize()) for row in plain)


def decrypt_rows(vectors: list[ts.CKKSVector]) -> np.ndarray:
    """The (chunks, slots) float64 decryption of ciphertexts loaded under a secret context."""
    return np.stack([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])


def clipped_values(update: np.ndarray, weight: int, params: CKKSParams, dim: int) -> np.ndarray:
    """Check ``update`` and ``weight``; clip to ±clip, multiply by the weight and (weighted
    rounds) append the weight as one more value."""
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise EncodingError("an update must be a one-dimensional numpy array")
    if update.dtype not in (np.float32, np.float64):
        raise EncodingError(f"an update must be float32 or float64, got {update.dtype}")
    if update.size != dim:
        raise EncodingError(f"update has {update.size} values, this round expects {dim}")
    if not np.isfinite(update).all():
        bad = int(np.flatnonzero(~np.isfinite(update))[0])
        raise EncodingError(f"update has a NaN or Inf value (first at index {bad})")
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise EncodingError(f"weight must be a positive integer, got {weight!r}")
    if not params.weighted and weight != 1:
        raise EncodingError("this round is unweighted; the weight must be 1")
    if weight > params.max_weight:
        raise EncodingError(f"weight {weight} exceeds the round's max_weight {params.max_weight}")
    values = np.clip(update.astype(np.float64), -params.clip, params.clip)
    if params.weighted:
        values *= weight
        values = np.append(values, float(weight))
    return values


@dataclass(frozen=True)
class DecryptedSum:
    """Σ w·Δ (Σ Δ when unweighted) as float32, the summed weight, and the contributor count."""

    total: FloatArray
    weight: float
    contributors: int

    def average(self) -> FloatArray:
        return (self.total / np.float32(self.weight)).astype(np.float32)


class HEAggregator:
    """The server: adds encrypted updates under the public context; cannot decrypt them."""

    def __init__(self, public: PublicContext, session_id: bytes, dim: int) -> None:
        self.public = public
        self.params = public.params
        self.session_id = check_session_id(session_id)
        if dim < 1:
            raise EncodingError(f"dimension must be at least 1, got {dim}")
        self.dim = dim
        self._sum: list[ts.CKKSVector] | None = None
        self._contributors: list[int] = []

    @property
    def contributors(self) -> tuple[int, ...]:
        return tuple(self._contributors)

    def add(self, sender: int, ciphertext: bytes) -> None:
        """Check ``sender``'s upload completely, then add it. On any error nothing is added and
        the aggregator goes on with the other clients."""
        check_client_id(sender)
        if sender in self._contributors:
            raise DuplicateClient(f"client {sender} already contributed to this aggregate")
        if len(self._contributors) >= self.params.max_clients:
            raise ConfigurationError(
                f"more than max_clients = {self.params.max_clients} uploads: the sum could overflow"
            )
        envelope = unpack(ciphertext, self.params, KIND_UPDATE, self.session_id, self.dim, 1)
        if envelope.fingerprint != self.public.fingerprint:
            raise ContextMismatch(
                f"client {sender} encrypted under another context (fingerprint "
                f"{envelope.fingerprint.hex()[:16]}…, the federation's is "
                f"{self.public.fingerprint.hex()[:16]}…)"
            )
        if envelope.ids != (sender,):
            raise CiphertextFormatError(
                f"the upload of client {sender} names client {envelope.ids[0]} as its sender"
            )
        vectors = load_chunks(envelope, self.public.context, self.params)
        if self._sum is None:
            self._sum = vectors
        else:
            for total, vector in zip(self._sum, vectors, strict=True):
                total.add_(vector)
        self._contributors.append(sender)

    def aggregate(self) -> bytes:
        """The encrypted sum of every accepted upload, naming its contributors."""
        if self._sum is None or len(self._contributors) < self.params.min_contributors:
            raise TooFewSurvivors(
                f"{len(self._contributors)} uploads arrived; the round needs at least "
                f"{self.params.min_contributors}"
            )
        return pack(
            Envelope(
                KIND_AGGREGATE,
                self.session_id,
                self.public.fingerprint,
                self.params.encoded_dim(self.dim),
                tuple(sorted(self._contributors)),
                tuple(bytes(v.serialize()) for v in self._sum),
            )
        )

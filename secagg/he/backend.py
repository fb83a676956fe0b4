"""Client and server sides of CKKS aggregation: encrypt, add, decrypt. Bytes in, bytes out.

- :class:`HEClient` (an institution holding the secret context) turns a float update into one
  envelope of ceil(d' / (N/2)) CKKS ciphertexts, d' = d (+1 weight slot when weighted), and
  decrypts an aggregate: any institution can be the decryptor, one or each.
- :class:`HEAggregator` (the server, holding only the public context) checks each envelope
  completely (session, fingerprint, dimension, chunk count, every ciphertext parses under the
  federation's parameters at the round's scale) *before* adding it, so a bad upload is discarded
  and never corrupts the running sum; a client that never uploads is simply not in the sum.

Envelope (big-endian): ``b"FSHE" | version u8 | kind u8 | session_id 32 | fingerprint 32 |
encoded_dim u32 | contributors u32 | chunks u32 | chunks × length u32 | ciphertexts``. Lengths are
checked against the round's parameters before anything is allocated or parsed.

Trust model (different from pairwise masking, see :mod:`secagg.he`): every institution holds the
secret key, so an institution that obtains another's individual ciphertext (the server colluding
with it, or a leaked upload) reads that update in the clear. The server chooses what it adds; the
decryptor can only check the contributor count the server claims against ``min_contributors``
and, in weighted mode, the decrypted weight sum.
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
from secagg.he.errors import AggregateIntegrityError, CiphertextFormatError, ContextMismatch
from secagg.he.keys import PublicContext, SecretContext
from secagg.he.params import CKKSParams
from secagg.ids import check_client_id, check_session_id

FloatArray = npt.NDArray[np.float32]

MAGIC = b"FSHE"
VERSION = 1
KIND_UPDATE = 1
KIND_AGGREGATE = 2
_HEADER = struct.Struct(">4sBB32s32sIII")
_LENGTH = struct.Struct(">I")
#: Slack over the raw ciphertext size for TenSEAL's and SEAL's serialization headers.
_SERIALIZATION_SLACK = 4096


@dataclass(frozen=True)
class _Envelope:
    kind: int
    session_id: bytes
    fingerprint: bytes
    encoded_dim: int
    contributors: int
    chunks: tuple[bytes, ...]


def _max_ciphertext_bytes(params: CKKSParams) -> int:
    # Two polynomials of N coefficients per data prime, 8 bytes each, before compression.
    primes = len(params.coeff_mod_bit_sizes) - 1
    return 2 * params.poly_modulus_degree * primes * 8 + _SERIALIZATION_SLACK


def _pack(envelope: _Envelope) -> bytes:
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        envelope.kind,
        envelope.session_id,
        envelope.fingerprint,
        envelope.encoded_dim,
        envelope.contributors,
        len(envelope.chunks),
    )
    lengths = b"".join(_LENGTH.pack(len(chunk)) for chunk in envelope.chunks)
    return b"".join((header, lengths, *envelope.chunks))


def _unpack(data: bytes, params: CKKSParams, kind: int, session_id: bytes, dim: int) -> _Envelope:
    """Parse and check an envelope's framing; the ciphertexts themselves are parsed later."""
    if not isinstance(data, bytes) or len(data) < _HEADER.size:
        raise CiphertextFormatError("encrypted message is truncated (shorter than its header)")
    magic, version, got_kind, got_session, fingerprint, encoded_dim, contributors, count = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC or version != VERSION:
        raise CiphertextFormatError("not a version-1 fedsec CKKS message")
    if got_kind != kind:
        raise CiphertextFormatError(f"expected message kind {kind}, got {got_kind}")
    if got_session != session_id:
        raise SessionMismatch("encrypted message belongs to another session")
    if encoded_dim != params.encoded_dim(dim):
        raise CiphertextFormatError(
            f"message encodes {encoded_dim} values, this round expects {params.encoded_dim(dim)}"
        )
    if count != params.chunk_count(dim):
        raise CiphertextFormatError(
            f"message has {count} ciphertexts, this round expects {params.chunk_count(dim)}"
        )
    offset = _HEADER.size
    if len(data) < offset + count * _LENGTH.size:
        raise CiphertextFormatError("encrypted message is truncated (length table)")
    lengths = [_LENGTH.unpack_from(data, offset + i * _LENGTH.size)[0] for i in range(count)]
    offset += count * _LENGTH.size
    limit = _max_ciphertext_bytes(params)
    if any(length == 0 or length > limit for length in lengths):
        raise CiphertextFormatError(f"a ciphertext length is 0 or above {limit} bytes")
    if len(data) != offset + sum(lengths):
        raise CiphertextFormatError("encrypted message length does not match its length table")
    chunks = []
    for length in lengths:
        chunks.append(data[offset : offset + length])
        offset += length
    return _Envelope(got_kind, got_session, fingerprint, encoded_dim, contributors, tuple(chunks))


def _load_chunks(
    envelope: _Envelope, context: ts.Context, params: CKKSParams, dim: int
) -> list[ts.CKKSVector]:
    """Deserialize every ciphertext against ``context``; check slot counts and the scale."""
    encoded_dim = params.encoded_dim(dim)
    vectors = []
    for index, chunk in enumerate(envelope.chunks):
        try:
            vector = ts.ckks_vector_from(context, chunk)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CiphertextFormatError(
                f"ciphertext {index} is not a CKKS ciphertext under this round's parameters: {exc}"
            ) from None
        expected = min(params.slots, encoded_dim - index * params.slots)
        if vector.size() != expected:
            raise CiphertextFormatError(
                f"ciphertext {index} holds {vector.size()} values, expected {expected}"
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


@dataclass(frozen=True)
class DecryptedSum:
    """Σ w·Δ (Σ Δ when unweighted) as float32, the summed weight, and the contributor count."""

    total: FloatArray
    weight: float
    contributors: int

    def average(self) -> FloatArray:
        return (self.total / np.float32(self.weight)).astype(np.float32)


class HEClient:
    """An institution: encrypts its update and, as decryptor, opens the aggregate."""

    def __init__(self, secret: SecretContext, session_id: bytes, dim: int) -> None:
        self.secret = secret
        self.params = secret.params
        self.session_id = check_session_id(session_id)
        if dim < 1:
            raise EncodingError(f"dimension must be at least 1, got {dim}")
        self.dim = dim

    def encrypt_update(self, update: np.ndarray, weight: int = 1) -> bytes:
        """Clip ``update`` to ±clip, multiply by ``weight`` (weighted rounds append it as one more
        slot) and encrypt it into ``params.chunk_count(dim)`` ciphertexts of N/2 slots."""
        params = self.params
        if not isinstance(update, np.ndarray) or update.ndim != 1:
            raise EncodingError("an update must be a one-dimensional numpy array")
        if update.dtype not in (np.float32, np.float64):
            raise EncodingError(f"an update must be float32 or float64, got {update.dtype}")
        if update.size != self.dim:
            raise EncodingError(f"update has {update.size} values, this round expects {self.dim}")
        if not np.isfinite(update).all():
            bad = int(np.flatnonzero(~np.isfinite(update))[0])
            raise EncodingError(f"update has a NaN or Inf value (first at index {bad})")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise EncodingError(f"weight must be a positive integer, got {weight!r}")
        if not params.weighted and weight != 1:
            raise EncodingError("this round is unweighted; the weight must be 1")
        if weight > params.max_weight:
            raise EncodingError(
                f"weight {weight} exceeds the round's max_weight {params.max_weight}"
            )
        values = np.clip(update.astype(np.float64), -params.clip, params.clip)
        if params.weighted:
            values *= weight
            values = np.append(values, float(weight))
        slots = params.slots
        # TenSEAL takes only Python lists. ts.ckks_vector() turns the list into a numpy array and
        # back into a list before calling the C++ constructor; calling that constructor directly
        # (the same one, same arguments) saves ~30% of the client's time at d = 1M. One tolist()
        # per ciphertext keeps peak memory at one chunk of Python floats.
        context = self.secret.context.data
        chunks = tuple(
            bytes(ts._ts_cpp.CKKSVector(context, values[i : i + slots].tolist()).serialize())
            for i in range(0, values.size, slots)
        )
        return _pack(
            _Envelope(
                KIND_UPDATE,
                self.session_id,
                self.secret.fingerprint,
                values.size,
                1,
                chunks,
            )
        )

    def decrypt_sum(self, aggregate: bytes) -> DecryptedSum:
        """Open the server's aggregate: refuse one with fewer than ``min_contributors``, decrypt,
        round to the release grid (:meth:`CKKSParams.release_step`) and split off the weight."""
        params = self.params
        envelope = _unpack(aggregate, params, KIND_AGGREGATE, self.session_id, self.dim)
        if envelope.fingerprint != self.secret.fingerprint:
            raise ContextMismatch("the aggregate was made under another federation key")
        if not params.min_contributors <= envelope.contributors <= params.max_clients:
            raise TooFewSurvivors(
                f"aggregate claims {envelope.contributors} contributors; decrypting needs "
                f"{params.min_contributors}..{params.max_clients}"
            )
        vectors = _load_chunks(envelope, self.secret.context, params, self.dim)
        plain = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])
        step = params.release_step(envelope.contributors)
        plain = np.round(plain / step) * step
        if params.weighted:
            weight = float(plain[-1])
            rounded = round(weight)
            if abs(weight - rounded) > 0.25 or not (
                envelope.contributors <= rounded <= envelope.contributors * params.max_weight
            ):
                raise AggregateIntegrityError(
                    f"decrypted weight sum {weight:.6g} is not an integer in "
                    f"[{envelope.contributors}, {envelope.contributors * params.max_weight}]"
                )
            return DecryptedSum(
                plain[:-1].astype(np.float32), float(rounded), envelope.contributors
            )
        return DecryptedSum(
            plain.astype(np.float32), float(envelope.contributors), envelope.contributors
        )


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
        envelope = _unpack(ciphertext, self.params, KIND_UPDATE, self.session_id, self.dim)
        if envelope.fingerprint != self.public.fingerprint:
            raise ContextMismatch(
                f"client {sender} encrypted under another context (fingerprint "
                f"{envelope.fingerprint.hex()[:16]}…, the federation's is "
                f"{self.public.fingerprint.hex()[:16]}…)"
            )
        if envelope.contributors != 1:
            raise CiphertextFormatError("an individual upload must count exactly one contributor")
        vectors = _load_chunks(envelope, self.public.context, self.params, self.dim)
        if self._sum is None:
            self._sum = vectors
        else:
            for total, vector in zip(self._sum, vectors, strict=True):
                total.add_(vector)
        self._contributors.append(sender)

    def aggregate(self) -> bytes:
        """The encrypted sum of every accepted upload, for the decryptor(s)."""
        if self._sum is None or len(self._contributors) < self.params.min_contributors:
            raise TooFewSurvivors(
                f"{len(self._contributors)} uploads arrived; the round needs at least "
                f"{self.params.min_contributors}"
            )
        return _pack(
            _Envelope(
                KIND_AGGREGATE,
                self.session_id,
                self.public.fingerprint,
                self.params.encoded_dim(self.dim),
                len(self._contributors),
                tuple(bytes(v.serialize()) for v in self._sum),
            )
        )

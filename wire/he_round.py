"""What server and client must compute identically in a CKKS round (``backend = "ckks"``).

- :func:`ckks_params_of`: the :class:`secagg.he.CKKSParams` a round's
  :class:`~fl_core.round_config.RoundConfig` describes (``max_clients`` is the cohort size, so
  both ends size the overflow check the same way), and :func:`ckks_spec_of`: the
  :class:`secagg.he.HeRoundSpec` both ends build their sessions from (here, not in
  :mod:`fl_core.round_config`, which stays free of TenSEAL).
- :func:`he_upload_limit` / :func:`aggregate_download_limit`: byte budgets of the CKKS uploads
  and of the aggregate sent to the decryptor, from the round parameters alone, checked before a
  payload is allocated.
- :func:`encode_release` / :func:`decode_release`: the decryptor's release of the sum: the
  float32 total, the summed weight and the contributor count, bound to the session id.

Release encoding (big-endian header, little-endian floats): ``b"FSDS" | version u8 |
session_id 32 | dim u32 | contributors u32 | weight f64 | dim × f32``.
"""

from __future__ import annotations

import struct

import numpy as np

from fl_core.round_config import CkksAggregation, RoundConfig
from secagg.errors import ConfigurationError, SessionMismatch
from secagg.he import CKKSParams, DecryptedSum, HeRoundSpec
from wire import fedsec_pb2 as pb
from wire.framing import WireFormatError

_RELEASE_MAGIC = b"FSDS"
_RELEASE_VERSION = 1
_RELEASE_HEADER = struct.Struct(">4sB32sIId")
#: Allowance for an envelope's header and length table beyond the ciphertexts themselves.
ENVELOPE_ALLOWANCE = 256
#: Per-ciphertext allowance for TenSEAL's and SEAL's serialization headers (and the length
#: field), the same margin :mod:`secagg.he.backend` accepts.
CIPHERTEXT_SLACK = 4096 + 4


def ckks_params_of(config: RoundConfig) -> CKKSParams:
    """The CKKS parameters of a round; raises :class:`ConfigurationError` for a round that is
    not a CKKS round or whose parameters are invalid (below 128-bit security, overflowing)."""
    agg = _ckks_of(config)
    train = config.train
    return CKKSParams(
        clip=agg.clip,
        max_clients=len(config.cohort),
        max_weight=train.max_weight if agg.weighted and train is not None else 1,
        weighted=agg.weighted,
        min_contributors=agg.ckks.min_contributors,
        poly_modulus_degree=agg.ckks.poly_modulus_degree,
        coeff_mod_bit_sizes=agg.ckks.coeff_mod_bit_sizes,
        scale_bits=agg.ckks.scale_bits,
    )


def ckks_spec_of(config: RoundConfig) -> HeRoundSpec:
    """The round as both sessions see it: parameters, session id, cohort, dimension and the
    federation fingerprint the config names. :class:`ConfigurationError` for an invalid one."""
    agg = _ckks_of(config)
    return HeRoundSpec(
        ckks_params_of(config), config.session_id, config.cohort, agg.dim, agg.ckks.fingerprint
    )


def _ckks_of(config: RoundConfig) -> CkksAggregation:
    agg = config.aggregation
    if not isinstance(agg, CkksAggregation):
        raise ConfigurationError(f"round {config.round_number} is not a CKKS round")
    return agg


def _envelope_limit(params: CKKSParams, dim: int) -> int:
    # Two polynomials of N coefficients per data prime, 8 bytes a coefficient, per ciphertext:
    # the uncompressed size; SEAL's compressed serialization is never larger. An aggregate
    # names up to max_clients (the cohort) contributors, 4 bytes each.
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    per_ciphertext = 2 * params.poly_modulus_degree * data_primes * 8 + CIPHERTEXT_SLACK
    ids = 4 * params.max_clients
    return ENVELOPE_ALLOWANCE + ids + params.chunk_count(dim) * per_ciphertext


def release_size(dim: int) -> int:
    return _RELEASE_HEADER.size + 4 * dim


def he_upload_limit(kind: int, params: CKKSParams, dim: int) -> int:
    """Most bytes a CKKS upload of ``kind`` can take in a round of these parameters."""
    if kind == pb.HE_UPDATE:
        return _envelope_limit(params, dim)
    if kind == pb.HE_DECRYPTED_SUM:
        return release_size(dim)
    raise WireFormatError(f"message kind {kind} is not a CKKS upload")


def aggregate_download_limit(params: CKKSParams, dim: int) -> int:
    """Most bytes the encrypted aggregate sent to a decryptor can take."""
    return _envelope_limit(params, dim)


def encode_release(session_id: bytes, released: DecryptedSum) -> bytes:
    total = np.ascontiguousarray(released.total, dtype="<f4")
    header = _RELEASE_HEADER.pack(
        _RELEASE_MAGIC,
        _RELEASE_VERSION,
        session_id,
        total.size,
        released.contributors,
        released.weight,
    )
    return header + total.tobytes()


def decode_release(data: bytes, session_id: bytes, dim: int) -> DecryptedSum:
    """Parse a decryptor's release for this session and dimension; refuses anything else."""
    if len(data) != release_size(dim):
        raise WireFormatError(
            f"a decrypted sum of {dim} values is {release_size(dim)} bytes, got {len(data)}"
        )
    magic, version, got_session, got_dim, contributors, weight = _RELEASE_HEADER.unpack_from(data)
    if magic != _RELEASE_MAGIC or version != _RELEASE_VERSION:
        raise WireFormatError("not a version-1 fedsec decrypted sum")
    if got_session != session_id:
        raise SessionMismatch("the decrypted sum belongs to another session")
    if got_dim != dim:
        raise WireFormatError(f"decrypted sum has {got_dim} values, this round has {dim}")
    total = np.frombuffer(data, dtype="<f4", offset=_RELEASE_HEADER.size).astype(np.float32)
    if not (np.isfinite(total).all() and np.isfinite(weight) and weight > 0):
        raise WireFormatError("the decrypted sum holds a NaN, an Inf or a non-positive weight")
    return DecryptedSum(total, float(weight), int(contributors))

"""Glue between the wire schema and :mod:`secagg`: what both ends must compute identically.

- :func:`admission_signed_bytes`: what a client signs to be admitted. It binds a single-use
  server nonce, the SHA-256 of the server certificate the client verified (so a signature
  obtained by a rogue server cannot be replayed to the real one, whose certificate differs)
  and the client id, under a domain label no protocol signature uses.
- :data:`KIND_OF` / :func:`upload_limit` / :func:`download_limit`: the byte budget of every
  message, from the round parameters alone, checked before a payload is allocated.
- :func:`params_from_config`: the secure-aggregation parameters a ``RoundConfig`` describes.
"""

from __future__ import annotations

from fl_core.wire import fedsec_pb2 as pb
from fl_core.wire.framing import WireFormatError
from secagg.ids import id_bytes
from secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    ConsistencySignature,
    MaskedInput,
    SeedCommit,
    ShareKeys,
    UnmaskResponse,
)
from secagg.packing import packed_size
from secagg.protocol import RoundParams

_ADMISSION_DOMAIN = b"fedsec/wire/v1/admission"
NONCE_BYTES = 32
#: Allowance for a message's own header and length fields (the canonical encoding uses < 64).
HEADER_ALLOWANCE = 256
#: Per-peer allowance for the small messages that list peers (ids, keys, shares, signatures).
PER_PEER_BYTES = 512
#: The largest global model a client accepts, in float32 elements (1 GiB).
MAX_MODEL_DIM = 1 << 28
#: The longest reason a client's ROUND_REFUSAL may carry (UTF-8).
REFUSAL_MAX_BYTES = 1024

KIND_OF: dict[type, pb.MessageKind] = {
    SeedCommit: pb.SEED_COMMIT,
    AdvertiseKeys: pb.ADVERTISE_KEYS,
    ShareKeys: pb.SHARE_KEYS,
    MaskedInput: pb.MASKED_INPUT,
    ConsistencySignature: pb.CONSISTENCY_SIGNATURE,
    UnmaskResponse: pb.UNMASK_RESPONSE,
}


def admission_signed_bytes(nonce: bytes, server_cert_sha256: bytes, client_id: int) -> bytes:
    return _ADMISSION_DOMAIN + nonce + server_cert_sha256 + id_bytes(client_id)


def kind_of(message: ClientMessage) -> pb.MessageKind:
    return KIND_OF[type(message)]


def upload_limit(kind: int, ring_bits: int, dim: int, cohort_size: int) -> int:
    """Most bytes a client message of ``kind`` can take in a round of these parameters."""
    if kind == pb.MASKED_INPUT:
        return packed_size(ring_bits, dim) + HEADER_ALLOWANCE
    if kind in KIND_OF.values():
        return HEADER_ALLOWANCE + PER_PEER_BYTES * cohort_size
    raise WireFormatError(f"unknown message kind {kind}")


def download_limit(cohort_size: int) -> int:
    """Most bytes a server->client secure-aggregation message can take (all are per-peer)."""
    return HEADER_ALLOWANCE + PER_PEER_BYTES * cohort_size


def train_task_of(config: pb.RoundConfig) -> pb.TrainTask:
    """The local-training fields of a round: a ``train`` task's, or a ``split`` task's."""
    return config.split.train if config.WhichOneof("task") == "split" else config.train


def params_from_config(config: pb.RoundConfig) -> RoundParams:
    """The session parameters a round config describes (secagg validates them)."""
    return RoundParams(
        session_id=config.session_id,
        ring_bits=config.ring_bits,
        dim=config.dim,
        threshold=config.threshold,
        cohort=tuple(config.cohort),
        neighbours=config.neighbours or None,
        quorum=config.quorum,
    )

"""Glue between the wire schema and :mod:`secagg`: what both ends must compute identically.

- :func:`admission_signed_bytes`: what a client signs to be admitted. It binds a single-use
  server nonce, the SHA-256 of the server certificate the client verified (so a signature
  obtained by a rogue server cannot be replayed to the real one, whose certificate differs)
  and the client id, under a domain label no protocol signature uses.
- :data:`KIND_OF` / :func:`upload_limit` / :func:`download_limit`: the byte budget of every
  message, from the round parameters alone, checked before a payload is allocated.
- :func:`plan_to_config` / :func:`plan_from_config`: a masking round's
  :class:`~fl_core.round.RoundPlan` (session parameters and codec, plain or DP) in and out of a
  ``RoundConfig``; :func:`params_from_config` its secure-aggregation parameters.
"""

from __future__ import annotations

from fl_core.round import RoundCodec, RoundPlan
from secagg.dp.encoder import DpParams
from secagg.dp.noise import MECHANISMS, Mechanism, NoiseSpec
from secagg.encoding import QuantizationParams
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
from secagg.params import SessionShape
from secagg.protocol import RoundParams
from wire import fedsec_pb2 as pb
from wire.framing import WireFormatError

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
    """The local-training fields of a round: a ``split`` task's, or else a ``train`` task's."""
    return config.split.train if config.WhichOneof("task") == "split" else config.train


def codec_to_config(codec: RoundCodec, config: pb.RoundConfig) -> None:
    """Write ``codec`` into a masking round's config (the edge: protobuf goes no further)."""
    config.ring_bits = codec.ring_bits
    config.dim = codec.encoded_dim
    config.contribution_dim = codec.contribution_size
    if codec.dp is not None:
        p = codec.dp
        config.dp.mechanism = p.noise.mechanism
        config.dp.stddev = p.noise.stddev
        config.dp.clip = p.clip
        config.dp.scale = p.scale
        config.dp.rotation_seed = p.seed
        config.dp.max_clients = p.max_clients
        config.dp.beta = p.beta
        config.weighted = False
        return
    q = codec.quant
    if q is None:
        raise WireFormatError("a codec without parameters")
    config.clip = q.clip
    config.scale = q.scale
    config.weighted = q.weighted
    if q.weighted:
        # A split round's task must be chosen before this (it carries its own TrainTask).
        train_task_of(config).max_weight = q.max_weight


def codec_from_config(config: pb.RoundConfig) -> RoundCodec:
    """The codec a masking round's config describes (secagg validates the parameters)."""
    size = config.contribution_dim or (config.dim - 1 if config.weighted else config.dim)
    if config.HasField("dp"):
        d = config.dp
        if d.mechanism not in MECHANISMS:
            raise WireFormatError(f"unknown DP mechanism {d.mechanism!r} in the round config")
        mechanism: Mechanism = d.mechanism
        params = DpParams(
            ring_bits=config.ring_bits,
            dim=size,
            clip=d.clip,
            scale=d.scale,
            noise=NoiseSpec(mechanism, d.stddev),
            seed=d.rotation_seed,
            max_clients=d.max_clients,
            beta=d.beta,
        )
        return RoundCodec(size, dp=params)
    quant = QuantizationParams(
        config.ring_bits,
        config.clip,
        config.scale,
        max_clients=len(config.cohort),
        max_weight=train_task_of(config).max_weight if config.weighted else 1,
        weighted=config.weighted,
    )
    return RoundCodec(size, quant=quant)


def plan_from_config(config: pb.RoundConfig) -> RoundPlan:
    """The masking round a config describes."""
    shape = SessionShape(config.threshold, config.neighbours or None, config.quorum)
    return RoundPlan(
        config.round_number,
        config.session_id,
        tuple(config.cohort),
        shape,
        codec_from_config(config),
        config.min_survivors,
    )


def plan_to_config(plan: RoundPlan, config: pb.RoundConfig) -> None:
    """Write a masking round's plan into its config."""
    config.round_number = plan.index
    config.session_id = plan.session_id
    del config.cohort[:]
    config.cohort.extend(plan.cohort)
    config.threshold = plan.shape.threshold
    config.neighbours = plan.shape.neighbours or 0
    config.quorum = plan.shape.quorum
    config.min_survivors = plan.min_survivors
    codec_to_config(plan.codec, config)


def params_from_config(config: pb.RoundConfig) -> RoundParams:
    """The secure-aggregation parameters a masking round's config describes."""
    return plan_from_config(config).secagg_params()

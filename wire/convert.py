"""Glue between the wire schema and :mod:`secagg`: what both ends must compute identically.

- :func:`admission_signed_bytes`: what a client signs to be admitted. It binds a single-use
  server nonce, the SHA-256 of the server certificate the client verified (so a signature
  obtained by a rogue server cannot be replayed to the real one, whose certificate differs)
  and the client id, under a domain label no protocol signature uses.
- :class:`UploadKind`: the kinds an upload declares, for code past this edge.
- :data:`KIND_OF` / :func:`upload_limit` / :func:`download_limit`: the byte budget of every
  message, from the round parameters alone, checked before a payload is allocated.
- :func:`round_config_to_pb` / :func:`round_config_from_pb`: a round's
  :class:`~fl_core.round_config.RoundConfig` (task, session shape and codec, plain or DP, or
  the CKKS parameters) in and out of the ``RoundConfig`` message. A client hashes and signs the
  bytes it received, then converts them; nothing past this edge reads the message.
"""

from __future__ import annotations

from dataclasses import fields
from enum import IntEnum

from fl_core.round import RoundCodec
from fl_core.round_config import (
    Backend,
    CkksAggregation,
    CkksRound,
    MaskingRound,
    RandomTask,
    RoundConfig,
    SplitTask,
    Task,
    TrainTask,
)
from fl_core.split import SplitSpec
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


class UploadKind(IntEnum):
    """What a client's upload declares it carries: the schema's ``MessageKind`` codes (a test
    pins the two equal), so that code past the edge never names the generated module. A kind
    received from a client is kept as a plain ``int`` until checked: one this version does not
    know must reach the check that refuses it."""

    ADVERTISE_KEYS = pb.ADVERTISE_KEYS
    SHARE_KEYS = pb.SHARE_KEYS
    MASKED_INPUT = pb.MASKED_INPUT
    CONSISTENCY_SIGNATURE = pb.CONSISTENCY_SIGNATURE
    UNMASK_RESPONSE = pb.UNMASK_RESPONSE
    HE_UPDATE = pb.HE_UPDATE
    HE_DECRYPTED_SUM = pb.HE_DECRYPTED_SUM
    SEED_COMMIT = pb.SEED_COMMIT
    ROUND_REFUSAL = pb.ROUND_REFUSAL


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


#: The backends this version knows, by their names in ``[rounds] backend`` / ``[client] backend``.
_BACKENDS: dict[int, Backend] = {pb.BACKEND_MASKING: "masking", pb.BACKEND_CKKS: "ckks"}


def backend_name(message: pb.RoundConfig) -> str:
    """The backend a received config names, ``"unknown (n)"`` for one this version does not
    know: what a client compares with its own before anything else (the refusal says both)."""
    return _BACKENDS.get(message.backend, f"unknown ({message.backend})")


def round_config_to_pb(config: RoundConfig) -> pb.RoundConfig:
    """The message of a round config (the coordinator serializes it once for the cohort)."""
    message = pb.RoundConfig(
        round_number=config.round_number,
        session_id=config.session_id,
        cohort=list(config.cohort),
        model_dim=config.model_dim,
    )
    task = config.task
    if isinstance(task, RandomTask):
        message.random.SetInParent()
        message.random.seed = task.seed
    elif isinstance(task, TrainTask):
        message.train.SetInParent()
        message.train.MergeFrom(_train_to_pb(task))
    else:
        message.split.SetInParent()
        message.split.MergeFrom(
            pb.SplitTask(
                train=_train_to_pb(task.train),
                client_bottom=task.spec.client_bottom,
                client_top=task.spec.client_top,
                max_length=task.max_length,
                hidden_size=task.hidden_size,
                step_timeout_s=task.step_timeout_s,
                join_timeout_s=task.join_timeout_s,
            )
        )
    aggregation = config.aggregation
    if isinstance(aggregation, MaskingRound):
        message.backend = pb.BACKEND_MASKING
        message.threshold = aggregation.shape.threshold
        message.neighbours = aggregation.shape.neighbours or 0
        message.quorum = aggregation.shape.quorum
        message.min_survivors = aggregation.min_survivors
        _codec_to_pb(aggregation.codec, message)
    else:
        ckks = aggregation.ckks
        message.backend = pb.BACKEND_CKKS
        message.ckks.SetInParent()
        message.ckks.poly_modulus_degree = ckks.poly_modulus_degree
        message.ckks.coeff_mod_bit_sizes.extend(ckks.coeff_mod_bit_sizes)
        message.ckks.scale_bits = ckks.scale_bits
        message.ckks.min_contributors = ckks.min_contributors
        message.ckks.fingerprint = ckks.fingerprint
        message.clip = aggregation.clip
        message.dim = aggregation.dim
        message.weighted = aggregation.weighted
    return message


def round_config_bytes(config: RoundConfig) -> bytes:
    """What RoundStart carries: the serialized message, hashed as received by every client."""
    data: bytes = round_config_to_pb(config).SerializeToString()
    return data


def round_config_from_pb(message: pb.RoundConfig) -> RoundConfig:
    """The round a received config describes. Refuses (typed: :class:`WireFormatError`, or the
    domain's :class:`~secagg.errors.ConfigurationError` / :class:`~fl_core.errors.FLError`)
    an unknown backend, a missing task, a backend without its parameters or with another's,
    an unknown DP mechanism and parameters the codec or the split cut refuse."""
    task = _task_from_pb(message)
    aggregation: MaskingRound | CkksAggregation
    backend = _BACKENDS.get(message.backend)
    if backend == "masking":
        if message.HasField("ckks"):
            raise WireFormatError(
                f"round {message.round_number} is a masking round carrying CKKS parameters"
            )
        aggregation = MaskingRound(
            SessionShape(message.threshold, message.neighbours or None, message.quorum),
            _codec_from_pb(message, task),
            message.min_survivors,
        )
    elif backend == "ckks":
        if not message.HasField("ckks"):
            raise WireFormatError(
                f"round {message.round_number} is a ckks round without CKKS parameters"
            )
        if message.HasField("dp"):
            raise WireFormatError(
                f"round {message.round_number} is a ckks round carrying DP parameters (the ckks "
                "backend offers no DP)"
            )
        c = message.ckks
        ckks = CkksRound(
            c.poly_modulus_degree,
            tuple(c.coeff_mod_bit_sizes),
            c.scale_bits,
            c.min_contributors,
            c.fingerprint,
        )
        aggregation = CkksAggregation(ckks, message.clip, message.dim, message.weighted)
    else:
        raise WireFormatError(
            f"round {message.round_number} names backend {message.backend}, which this version "
            "does not know"
        )
    return RoundConfig(
        message.round_number,
        message.session_id,
        tuple(message.cohort),
        aggregation,
        task,
        message.model_dim,
    )


def _train_to_pb(task: TrainTask) -> pb.TrainTask:
    # The domain's field names are the message's (a test pins the two sets equal).
    return pb.TrainTask(**{f.name: getattr(task, f.name) for f in fields(TrainTask)})


def _train_from_pb(message: pb.TrainTask) -> TrainTask:
    return TrainTask(**{f.name: getattr(message, f.name) for f in fields(TrainTask)})


def _task_from_pb(message: pb.RoundConfig) -> Task:
    kind = message.WhichOneof("task")
    if kind == "random":
        return RandomTask(message.random.seed)
    if kind == "train":
        return _train_from_pb(message.train)
    if kind == "split":
        s = message.split
        return SplitTask(
            _train_from_pb(s.train),
            SplitSpec(s.client_bottom, s.client_top),
            s.max_length,
            s.hidden_size,
            s.step_timeout_s,
            s.join_timeout_s,
        )
    raise WireFormatError(f"round {message.round_number} has no task this client knows")


def _codec_to_pb(codec: RoundCodec, message: pb.RoundConfig) -> None:
    message.ring_bits = codec.ring_bits
    message.dim = codec.encoded_dim
    message.contribution_dim = codec.contribution_size
    if codec.dp is not None:
        p = codec.dp
        message.dp.mechanism = p.noise.mechanism
        message.dp.stddev = p.noise.stddev
        message.dp.clip = p.clip
        message.dp.scale = p.scale
        message.dp.rotation_seed = p.seed
        message.dp.max_clients = p.max_clients
        message.dp.beta = p.beta
        message.weighted = False
        return
    q = codec.quant
    if q is None:
        raise WireFormatError("a codec without parameters")
    # max_clients is the cohort and a weighted codec's max_weight the task's (RoundConfig
    # checks both), so neither travels twice.
    message.clip = q.clip
    message.scale = q.scale
    message.weighted = q.weighted


def _codec_from_pb(message: pb.RoundConfig, task: Task) -> RoundCodec:
    """The codec a masking round's config describes (secagg validates the parameters)."""
    size = message.contribution_dim or (message.dim - 1 if message.weighted else message.dim)
    if message.HasField("dp"):
        d = message.dp
        if d.mechanism not in MECHANISMS:
            raise WireFormatError(f"unknown DP mechanism {d.mechanism!r} in the round config")
        mechanism: Mechanism = d.mechanism
        params = DpParams(
            ring_bits=message.ring_bits,
            dim=size,
            clip=d.clip,
            scale=d.scale,
            noise=NoiseSpec(mechanism, d.stddev),
            seed=d.rotation_seed,
            max_clients=d.max_clients,
            beta=d.beta,
        )
        return RoundCodec(size, dp=params)
    train = task.train if isinstance(task, SplitTask) else task
    task_weight = train.max_weight if isinstance(train, TrainTask) else 0
    quant = QuantizationParams(
        message.ring_bits,
        message.clip,
        message.scale,
        max_clients=len(message.cohort),
        max_weight=task_weight if message.weighted else 1,
        weighted=message.weighted,
    )
    return RoundCodec(size, quant=quant)

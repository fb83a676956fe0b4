from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_MASKING: _ClassVar[Backend]
    BACKEND_CKKS: _ClassVar[Backend]

class MessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_KIND_UNSPECIFIED: _ClassVar[MessageKind]
    ADVERTISE_KEYS: _ClassVar[MessageKind]
    SHARE_KEYS: _ClassVar[MessageKind]
    MASKED_INPUT: _ClassVar[MessageKind]
    CONSISTENCY_SIGNATURE: _ClassVar[MessageKind]
    UNMASK_RESPONSE: _ClassVar[MessageKind]
    HE_UPDATE: _ClassVar[MessageKind]
    HE_DECRYPTED_SUM: _ClassVar[MessageKind]
    SEED_COMMIT: _ClassVar[MessageKind]
    ROUND_REFUSAL: _ClassVar[MessageKind]

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    BOTTOM_ACTIVATION: _ClassVar[TensorKind]
    TOP_ACTIVATION: _ClassVar[TensorKind]
    TOP_GRADIENT: _ClassVar[TensorKind]
    BOTTOM_GRADIENT: _ClassVar[TensorKind]
BACKEND_MASKING: Backend
BACKEND_CKKS: Backend
MESSAGE_KIND_UNSPECIFIED: MessageKind
ADVERTISE_KEYS: MessageKind
SHARE_KEYS: MessageKind
MASKED_INPUT: MessageKind
CONSISTENCY_SIGNATURE: MessageKind
UNMASK_RESPONSE: MessageKind
HE_UPDATE: MessageKind
HE_DECRYPTED_SUM: MessageKind
SEED_COMMIT: MessageKind
ROUND_REFUSAL: MessageKind
TENSOR_KIND_UNSPECIFIED: TensorKind
BOTTOM_ACTIVATION: TensorKind
TOP_ACTIVATION: TensorKind
TOP_GRADIENT: TensorKind
BOTTOM_GRADIENT: TensorKind

class ChallengeRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    def __init__(self, client_id: _Optional[int] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class AuthenticateRequest(_message.Message):
    __slots__ = ("client_id", "nonce", "server_cert_sha256", "signature", "instance")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_CERT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    nonce: bytes
    server_cert_sha256: bytes
    signature: bytes
    instance: bytes
    def __init__(self, client_id: _Optional[int] = ..., nonce: _Optional[bytes] = ..., server_cert_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., instance: _Optional[bytes] = ...) -> None: ...

class AuthenticateReply(_message.Message):
    __slots__ = ("token", "next_seq")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    next_seq: int
    def __init__(self, token: _Optional[bytes] = ..., next_seq: _Optional[int] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("token", "seq", "wait_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    seq: int
    wait_ms: int
    def __init__(self, token: _Optional[bytes] = ..., seq: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("round_number", "session_id", "ring_bits", "dim", "threshold", "cohort", "neighbours", "model_dim", "random", "train", "split", "clip", "scale", "weighted", "backend", "ckks", "quorum", "min_survivors", "dp", "contribution_dim")
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIM_FIELD_NUMBER: _ClassVar[int]
    RANDOM_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CKKS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    MIN_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_DIM_FIELD_NUMBER: _ClassVar[int]
    round_number: int
    session_id: bytes
    ring_bits: int
    dim: int
    threshold: int
    cohort: _containers.RepeatedScalarFieldContainer[int]
    neighbours: int
    model_dim: int
    random: RandomTask
    train: TrainTask
    split: SplitTask
    clip: float
    scale: float
    weighted: bool
    backend: Backend
    ckks: CkksRound
    quorum: int
    min_survivors: int
    dp: DpRound
    contribution_dim: int
    def __init__(self, round_number: _Optional[int] = ..., session_id: _Optional[bytes] = ..., ring_bits: _Optional[int] = ..., dim: _Optional[int] = ..., threshold: _Optional[int] = ..., cohort: _Optional[_Iterable[int]] = ..., neighbours: _Optional[int] = ..., model_dim: _Optional[int] = ..., random: _Optional[_Union[RandomTask, _Mapping]] = ..., train: _Optional[_Union[TrainTask, _Mapping]] = ..., split: _Optional[_Union[SplitTask, _Mapping]] = ..., clip: _Optional[float] = ..., scale: _Optional[float] = ..., weighted: _Optional[bool] = ..., backend: _Optional[_Union[Backend, str]] = ..., ckks: _Optional[_Union[CkksRound, _Mapping]] = ..., quorum: _Optional[int] = ..., min_survivors: _Optional[int] = ..., dp: _Optional[_Union[DpRound, _Mapping]] = ..., contribution_dim: _Optional[int] = ...) -> None: ...

class DpRound(_message.Message):
    __slots__ = ("mechanism", "stddev", "clip", "scale", "rotation_seed", "max_clients", "beta")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    stddev: float
    clip: float
    scale: float
    rotation_seed: bytes
    max_clients: int
    beta: float
    def __init__(self, mechanism: _Optional[str] = ..., stddev: _Optional[float] = ..., clip: _Optional[float] = ..., scale: _Optional[float] = ..., rotation_seed: _Optional[bytes] = ..., max_clients: _Optional[int] = ..., beta: _Optional[float] = ...) -> None: ...

class CkksRound(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "min_contributors", "fingerprint")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    min_contributors: int
    fingerprint: bytes
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ..., min_contributors: _Optional[int] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class RandomTask(_message.Message):
    __slots__ = ("seed",)
    SEED_FIELD_NUMBER: _ClassVar[int]
    seed: int
    def __init__(self, seed: _Optional[int] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("seed", "local_steps", "learning_rate", "batch_size", "max_weight", "layout_fingerprint", "local_epochs", "optimizer", "max_grad_norm", "strategy", "prox_mu", "server_control", "objective", "dpo_beta", "dpo_loss", "dpo_reference")
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    SERVER_CONTROL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    DPO_BETA_FIELD_NUMBER: _ClassVar[int]
    DPO_LOSS_FIELD_NUMBER: _ClassVar[int]
    DPO_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    seed: int
    local_steps: int
    learning_rate: float
    batch_size: int
    max_weight: int
    layout_fingerprint: str
    local_epochs: int
    optimizer: str
    max_grad_norm: float
    strategy: str
    prox_mu: float
    server_control: bool
    objective: str
    dpo_beta: float
    dpo_loss: str
    dpo_reference: bytes
    def __init__(self, seed: _Optional[int] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_weight: _Optional[int] = ..., layout_fingerprint: _Optional[str] = ..., local_epochs: _Optional[int] = ..., optimizer: _Optional[str] = ..., max_grad_norm: _Optional[float] = ..., strategy: _Optional[str] = ..., prox_mu: _Optional[float] = ..., server_control: _Optional[bool] = ..., objective: _Optional[str] = ..., dpo_beta: _Optional[float] = ..., dpo_loss: _Optional[str] = ..., dpo_reference: _Optional[bytes] = ...) -> None: ...

class SplitTask(_message.Message):
    __slots__ = ("train", "client_bottom", "client_top", "max_length", "hidden_size", "step_timeout_s", "join_timeout_s")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_BOTTOM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOP_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    JOIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    train: TrainTask
    client_bottom: int
    client_top: int
    max_length: int
    hidden_size: int
    step_timeout_s: float
    join_timeout_s: float
    def __init__(self, train: _Optional[_Union[TrainTask, _Mapping]] = ..., client_bottom: _Optional[int] = ..., client_top: _Optional[int] = ..., max_length: _Optional[int] = ..., hidden_size: _Optional[int] = ..., step_timeout_s: _Optional[float] = ..., join_timeout_s: _Optional[float] = ...) -> None: ...

class RoundStart(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: bytes
    def __init__(self, config: _Optional[bytes] = ...) -> None: ...

class SecAggItem(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    def __init__(self, session_id: _Optional[bytes] = ...) -> None: ...

class HeAggregate(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    def __init__(self, session_id: _Optional[bytes] = ...) -> None: ...

class RoundEnd(_message.Message):
    __slots__ = ("round_number", "completed", "reason", "final")
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    round_number: int
    completed: bool
    reason: str
    final: bool
    def __init__(self, round_number: _Optional[int] = ..., completed: _Optional[bool] = ..., reason: _Optional[str] = ..., final: _Optional[bool] = ...) -> None: ...

class Idle(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerItem(_message.Message):
    __slots__ = ("seq", "idle", "round_start", "secagg", "round_end", "he_aggregate", "payload_size")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    ROUND_START_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    ROUND_END_FIELD_NUMBER: _ClassVar[int]
    HE_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    idle: Idle
    round_start: RoundStart
    secagg: SecAggItem
    round_end: RoundEnd
    he_aggregate: HeAggregate
    payload_size: int
    def __init__(self, seq: _Optional[int] = ..., idle: _Optional[_Union[Idle, _Mapping]] = ..., round_start: _Optional[_Union[RoundStart, _Mapping]] = ..., secagg: _Optional[_Union[SecAggItem, _Mapping]] = ..., round_end: _Optional[_Union[RoundEnd, _Mapping]] = ..., he_aggregate: _Optional[_Union[HeAggregate, _Mapping]] = ..., payload_size: _Optional[int] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("item", "chunk")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    item: ServerItem
    chunk: bytes
    def __init__(self, item: _Optional[_Union[ServerItem, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SubmitHeader(_message.Message):
    __slots__ = ("token", "round_number", "session_id", "kind", "payload_size")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    round_number: int
    session_id: bytes
    kind: MessageKind
    payload_size: int
    def __init__(self, token: _Optional[bytes] = ..., round_number: _Optional[int] = ..., session_id: _Optional[bytes] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., payload_size: _Optional[int] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmitHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[SubmitHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("step", "kind", "shape", "lengths", "payload_size")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    step: int
    kind: TensorKind
    shape: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    payload_size: int
    def __init__(self, step: _Optional[int] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., shape: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., payload_size: _Optional[int] = ...) -> None: ...

class SplitOpen(_message.Message):
    __slots__ = ("token", "round_number", "session_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    round_number: int
    session_id: bytes
    def __init__(self, token: _Optional[bytes] = ..., round_number: _Optional[int] = ..., session_id: _Optional[bytes] = ...) -> None: ...

class SplitTurn(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitUp(_message.Message):
    __slots__ = ("open", "tensor", "chunk")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    open: SplitOpen
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, open: _Optional[_Union[SplitOpen, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SplitDown(_message.Message):
    __slots__ = ("turn", "tensor", "chunk")
    TURN_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    turn: SplitTurn
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, turn: _Optional[_Union[SplitTurn, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

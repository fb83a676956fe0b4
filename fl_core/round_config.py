"""What a deployed round announces, as domain objects: the round config and its task.

The coordinator builds a :class:`RoundConfig` (:mod:`server.global_model`), :mod:`wire.convert`
turns it into the ``RoundConfig`` message and back, and everything past the edge (the trainer,
the split link, the run record) reads these objects, never protobuf. Each field of the message
has one place here; what can be derived is not repeated:

* the masking round's ring, dimensions, quantisation or DP parameters are its
  :class:`~fl_core.round.RoundCodec`, its threshold, graph and quorum a
  :class:`~secagg.params.SessionShape`, and :meth:`RoundConfig.plan` the
  :class:`~fl_core.round.RoundPlan` a client binds;
* a CKKS round's public parameters are :class:`CkksRound`; the
  :class:`~secagg.he.HeRoundSpec` both sessions use is derived at the edge
  (:func:`wire.he_round.ckks_spec_of`), so this module stays free of TenSEAL.

What a client signs and hashes is never rebuilt from these objects: it binds the exact bytes it
received (:meth:`fl_core.round.RoundPlan.client_context`), and converts them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fl_core.errors import RoundConfigError
from fl_core.round import RoundCodec, RoundPlan
from fl_core.split import SplitSpec, StepLimits
from secagg.dp.encoder import DpParams
from secagg.params import SessionShape

Backend = Literal["masking", "ckks"]


@dataclass(frozen=True)
class RandomTask:
    """Load testing: each client submits a pseudo-random vector drawn from (seed, round, id)."""

    seed: int = 0


@dataclass(frozen=True)
class TrainTask:
    """Local LoRA training as the coordinator's recipe sets it for this round.

    Zero and empty values mean what the schema says they mean (the recipe default, no FedProx,
    no reference): the trainer interprets them, exactly as it did the message's fields.
    """

    seed: int = 0
    local_steps: int = 0
    #: This round's client learning rate (the coordinator applies the recipe's schedule).
    learning_rate: float = 0.0
    batch_size: int = 0
    #: Largest weight (sample or pair count) a client may submit; sizes the no-wrap check.
    max_weight: int = 0
    #: :meth:`fl_core.updates.LoraLayout.fingerprint` of the tensors the global vector holds.
    layout_fingerprint: str = ""
    local_epochs: int = 0
    optimizer: str = ""
    max_grad_norm: float = 0.0
    #: The server's strategy, whose client-side rule the client applies ("" is FedAvg).
    strategy: str = ""
    prox_mu: float = 0.0
    #: SCAFFOLD: the server's control variate follows the global vector in the payload.
    server_control: bool = False
    #: "" or "sft" (next-token loss) or "dpo" (the DPO loss on preference pairs).
    objective: str = ""
    dpo_beta: float = 0.0
    dpo_loss: str = ""
    #: SHA-256 of the DPO stage's reference vector (empty: this round's global vector).
    dpo_reference: bytes = b""


@dataclass(frozen=True)
class SplitTask:
    """Split training: local training of the client part through the server's blocks."""

    train: TrainTask
    spec: SplitSpec
    #: Every step tensor is at most ``train.batch_size x max_length x hidden_size`` float32.
    max_length: int
    hidden_size: int
    #: Each message of a step is due within this many seconds of the other side's last one.
    step_timeout_s: float
    #: How long after the round starts an institution may take to open its stream.
    join_timeout_s: float

    @property
    def limits(self) -> StepLimits:
        """The step tensors' bounds (raises :class:`~fl_core.split.SplitConfigError` for a
        round whose limits are not positive)."""
        return StepLimits(self.train.batch_size, self.max_length, self.hidden_size)


Task = RandomTask | TrainTask | SplitTask


@dataclass(frozen=True)
class MaskingRound:
    """How a masking round sums: the session's shape, the codec, the DP release floor."""

    shape: SessionShape
    codec: RoundCodec
    #: The fewest contributors a release may have beyond t and the quorum (0: none).
    min_survivors: int = 0


@dataclass(frozen=True)
class CkksRound:
    """The public CKKS parameters of a round, as the key dealer fixed them."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    #: The smallest aggregate a decryptor opens.
    min_contributors: int
    #: SHA-256 of the federation's public context, signed by the key dealer.
    fingerprint: bytes


@dataclass(frozen=True)
class CkksAggregation:
    """How a CKKS round sums: its parameters, and the clip, length and weighting of an update
    (``max_clients`` is the cohort, ``max_weight`` the train task's)."""

    ckks: CkksRound
    clip: float
    dim: int
    weighted: bool


@dataclass(frozen=True)
class RoundConfig:
    """One round as the coordinator announces it to every member of its cohort.

    The invariants checked here are the ones the message encodes implicitly (a quantised
    codec's ``max_clients`` is the cohort size and its ``max_weight`` the task's), so that a
    config and its message convert into each other without loss.
    """

    round_number: int
    session_id: bytes
    cohort: tuple[int, ...]
    aggregation: MaskingRound | CkksAggregation
    task: Task
    #: Length of the global float32 vector that follows RoundStart (0: none).
    model_dim: int = 0

    def __post_init__(self) -> None:
        weighted = False
        agg = self.aggregation
        if isinstance(agg, MaskingRound):
            quant = agg.codec.quant
            if quant is not None:
                weighted = quant.weighted
                if quant.max_clients != len(self.cohort):
                    raise RoundConfigError(
                        f"the codec is sized for {quant.max_clients} clients, the cohort has "
                        f"{len(self.cohort)}"
                    )
                train = self.train
                if weighted and train is not None and quant.max_weight != train.max_weight:
                    raise RoundConfigError(
                        f"the codec's max_weight is {quant.max_weight}, the task's "
                        f"{train.max_weight}"
                    )
        else:
            weighted = agg.weighted
        if weighted and self.train is None:
            raise RoundConfigError(
                "a weighted round needs a train or split task (its max_weight bounds the weight)"
            )

    @property
    def backend(self) -> Backend:
        return "masking" if isinstance(self.aggregation, MaskingRound) else "ckks"

    @property
    def train(self) -> TrainTask | None:
        """The local-training fields: a split task's, a train task's, or None (random)."""
        task = self.task
        if isinstance(task, SplitTask):
            return task.train
        return task if isinstance(task, TrainTask) else None

    @property
    def masking(self) -> MaskingRound:
        if not isinstance(self.aggregation, MaskingRound):
            raise RoundConfigError(f"round {self.round_number} is not a masking round")
        return self.aggregation

    @property
    def dp(self) -> DpParams | None:
        """The round's distributed-DP parameters (masking with DP only)."""
        agg = self.aggregation
        return agg.codec.dp if isinstance(agg, MaskingRound) else None

    @property
    def contribution_size(self) -> int:
        """Length of a client's contribution before encoding or encryption."""
        agg = self.aggregation
        return agg.codec.contribution_size if isinstance(agg, MaskingRound) else agg.dim

    @property
    def clip(self) -> float:
        """The bound a contribution is clipped to (per coordinate, or in L2 norm with DP)."""
        agg = self.aggregation
        if isinstance(agg, CkksAggregation):
            return agg.clip
        if agg.codec.dp is not None:
            return agg.codec.dp.clip
        quant = agg.codec.quant
        if quant is None:
            raise RoundConfigError("a codec without parameters")
        return quant.clip

    def plan(self) -> RoundPlan:
        """The masking round every client binds (:class:`RoundConfigError` under ckks)."""
        masking = self.masking
        return RoundPlan(
            self.round_number,
            self.session_id,
            self.cohort,
            masking.shape,
            masking.codec,
            masking.min_survivors,
        )

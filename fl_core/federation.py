"""The in-process federation: R rounds over N institutions, every aggregate a secure sum.

One round (:meth:`Federation.run_round`):

1. sample the cohort (:class:`~fl_core.sampling.ClientSampler`, deterministic in the seed);
2. each cohort member trains from the current global vector (a :class:`ClientTrainer`, which
   is where torch lives -- this module is numpy-only) and turns its update into the strategy's
   contribution;
3. each contribution is encoded (:mod:`secagg.encoding`, or :mod:`secagg.dp.encoder` with
   distributed DP) and the cohort runs a full Bonawitz/SecAgg+ session
   (:class:`secagg.simulate.Simulation`) with a fresh ``os.urandom(32)`` session id and graph
   seed; the graph is a SecAgg+ Harary graph (:func:`~secagg.params.secaggplus_params`) when the
   cohort is large enough for one, the complete graph with :func:`~secagg.params.classic_threshold`
   otherwise. Each client signs a digest of the global vector it was given, so the session
   aborts if clients were served different models;
4. the released sum is decoded and checked against the plaintext sum of the *same* client
   vectors (:func:`~fl_core.strategies.reference_sum`), see :func:`quantization_bound`;
5. the strategy turns the released aggregate into the next global vector, which is evaluated.

Weights travel inside the secure sum (weighted encoding: the weight is the last coordinate), so
the server learns only sums. With DP on, every client has weight 1 (a sample count is private
and unbounded, so it cannot scale a clipped contribution), the contribution is clipped in L2 and
noised by the client (:mod:`secagg.dp`), and the noise is calibrated for the fewest
contributors a round can release (the Shamir threshold). Cohorts are drawn uniformly with a
fixed size; the accountant's Poisson-sampling rate is the cohort's share of the population,
exact when every institution takes part in every round (the embedded default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fl_core.errors import FLError
from fl_core.sampling import ClientSampler
from fl_core.strategies import (
    AggregateInput,
    ClientOptions,
    Strategy,
    build_strategy,
    reference_sum,
)
from fl_core.updates import check_finite
from secagg.dp.calibration import Calibration, accounting_record, calibrate
from secagg.dp.encoder import DpEncoder
from secagg.dp.noise import Mechanism
from secagg.encoding import QuantizationParams, decode_sum, encode
from secagg.errors import ConfigurationError
from secagg.params import classic_threshold, secaggplus_params
from secagg.protocol import ClientPolicy, RoundParams
from secagg.ring import RingArray
from secagg.simulate import Simulation
from secagg.transcript import Transcript

#: Below this cohort size the complete graph is used: a Harary graph would need nearly every
#: client as a neighbour anyway, and the SecAgg+ parameter search has no solution.
SECAGGPLUS_MIN_COHORT = 16
#: Relative error of rounding a float64 to float32 (round to nearest): |fl(x) - x| <= 2^-24 |x|.
_FLOAT32_REL = 2.0**-24


class FederationConfigError(FLError, ValueError):
    """Federation settings that cannot run (too few institutions, bad DP target, ...)."""


class SecureAggregateMismatch(FLError, RuntimeError):
    """The secure aggregate differs from the plaintext sum by more than the encoding allows."""


@dataclass(frozen=True)
class ClientUpdate:
    """What one client's local training produced (never leaves the client unencoded)."""

    delta: np.ndarray  # trained - global, float32, over the trainable layout
    num_samples: int
    train_loss: float
    control_delta: np.ndarray | None = None  # SCAFFOLD only


class ClientTrainer(Protocol):
    """Local training of one institution, e.g. :class:`clients.simulate_cli.TorchTrainer`."""

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate: ...


#: Global vector -> eval loss per domain (or per named held-out set).
Evaluator = Callable[[np.ndarray], Mapping[str, float]]


@dataclass(frozen=True)
class SecAggSettings:
    """Threat model and encoding of the secure sum.

    ``clip`` bounds each coordinate of a client's (unweighted) contribution; it is public and
    must not depend on the data. ``corrupt_fraction``/``dropout_fraction`` set the threshold.
    """

    clip: float
    ring_bits: int = 32
    corrupt_fraction: float = 0.05
    dropout_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise FederationConfigError(f"clip must be a positive number, got {self.clip}")


@dataclass(frozen=True)
class DpSettings:
    """Client-level distributed DP: (epsilon, delta) over the whole run, L2 clip of an update."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    mechanism: Mechanism = "skellam"
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise FederationConfigError(f"DP epsilon must be a positive number, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise FederationConfigError(f"DP delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise FederationConfigError(f"DP clip must be a positive number, got {self.clip}")


@dataclass(frozen=True)
class FederationConfig:
    clients: tuple[str, ...]
    rounds: int
    secagg: SecAggSettings
    strategy: str = "fedavg"
    strategy_hparams: Mapping[str, object] = field(default_factory=dict)
    cohort_size: int | None = None  # None: every institution, every round
    dp: DpSettings | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        minimum = ClientPolicy().min_cohort
        if len(set(self.clients)) != len(self.clients):
            raise FederationConfigError("institution names must be unique")
        if self.rounds < 1:
            raise FederationConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.cohort < minimum:
            raise FederationConfigError(
                f"a cohort of {self.cohort} is below the {minimum} clients an institution's "
                "default policy requires for secure aggregation"
            )
        if self.cohort > len(self.clients):
            raise FederationConfigError(
                f"cohort of {self.cohort} from only {len(self.clients)} institutions"
            )

    @property
    def cohort(self) -> int:
        return len(self.clients) if self.cohort_size is None else self.cohort_size

    @property
    def sampling_rate(self) -> float:
        return self.cohort / len(self.clients)


@dataclass(frozen=True)
class GraphChoice:
    threshold: int
    neighbours: int | None  # None: complete graph


def choose_graph(cohort: int, settings: SecAggSettings) -> GraphChoice:
    """SecAgg+ (k, t) for a large cohort, else the complete graph and the classic threshold."""
    if cohort >= SECAGGPLUS_MIN_COHORT:
        try:
            plus = secaggplus_params(cohort, settings.corrupt_fraction, settings.dropout_fraction)
            return GraphChoice(plus.t, plus.k)
        except ConfigurationError:
            pass  # no sparse graph is secure here: the complete graph always is
    try:
        threshold = classic_threshold(cohort, settings.corrupt_fraction, settings.dropout_fraction)
    except ConfigurationError as exc:
        raise FederationConfigError(str(exc)) from exc
    return GraphChoice(threshold, None)


def quantization_bound(
    params: QuantizationParams, contributors: int, weight_sum: float, decoded_max_abs: float
) -> float:
    """Largest possible |secure mean - plaintext mean| on any coordinate, no DP.

    Each client encodes ``q = round_stochastic(scale * w * clip(x))``; stochastic rounding moves
    each coordinate by less than one unit, i.e. by less than ``step = 1/scale`` in units of
    ``w * x``. The ring sum of ``contributors`` such vectors is exact (secure aggregation adds
    nothing and the encoding is sized never to wrap), so the decoded sum of ``w * clip(x)``
    differs from the plaintext one by less than ``contributors * step`` per coordinate, and the
    weighted mean (the weights travel exactly, as integers) by less than
    ``contributors * step / weight_sum``. :func:`secagg.encoding.decode_sum` returns the sum as
    float32, which adds at most ``2^-24 * |sum|`` per coordinate; that term is included.
    """
    return (contributors * params.step + _FLOAT32_REL * decoded_max_abs) / weight_sum


@dataclass(frozen=True)
class RoundMetrics:
    """One line of ``metrics.jsonl``."""

    round: int
    cohort: tuple[str, ...]
    contributors: tuple[str, ...]
    train_loss: float
    eval_loss: dict[str, float]
    eval_loss_mean: float
    round_s: float
    train_s: float
    aggregation_s: float
    stage_s: dict[str, float]
    client_mask_s: float  # mean per client: building its masked input (all PRG expansions)
    upload_bytes: dict[str, float]
    secure_vs_plain_max_abs_diff: float
    quantization_bound: float
    clip_fraction: float
    threshold: int
    neighbours: int | None
    session_id: str
    dp: dict[str, Any] | None = None  # accountant fields; merged into the record

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record.pop("dp")
        record["cohort"] = list(self.cohort)
        record["contributors"] = list(self.contributors)
        if self.dp is not None:
            record.update(self.dp)
        return record


@dataclass(frozen=True)
class RoundOutcome:
    metrics: RoundMetrics
    global_vector: np.ndarray
    transcript: Transcript


@dataclass(frozen=True)
class _Aggregate:
    agg: AggregateInput
    contributors: tuple[int, ...]
    transcript: Transcript
    stage_s: dict[str, float]
    mask_s: float
    upload: dict[int, int]
    diff: float
    bound: float
    clip_fraction: float


class Federation:
    """Runs the rounds; holds the global vector and the strategy's server state."""

    def __init__(
        self,
        config: FederationConfig,
        trainer: ClientTrainer,
        evaluator: Evaluator,
        initial_vector: np.ndarray,
        max_samples: int,
    ) -> None:
        check_finite(initial_vector, "initial global vector")
        if max_samples < 1:
            raise FederationConfigError(f"max_samples must be >= 1, got {max_samples}")
        self.config = config
        self.trainer = trainer
        self.evaluator = evaluator
        self.global_vector = initial_vector.astype(np.float32)
        self.dim = int(initial_vector.size)
        hparams = dict(config.strategy_hparams)
        if config.strategy.lower() == "scaffold":
            hparams.setdefault("num_clients", len(config.clients))
        self.strategy: Strategy = build_strategy(config.strategy, self.dim, hparams)
        self.sampler = ClientSampler(config.seed, cohort_size=config.cohort)
        # Secure-aggregation ids are 1-based positions in the sorted population (0 is Shamir's
        # secret coordinate and is never an id).
        self.ids = {name: i + 1 for i, name in enumerate(sorted(config.clients))}
        self.graph = choose_graph(config.cohort, config.secagg)
        size = self.strategy.contribution_size()
        weighted = config.dp is None
        max_weight = max_samples if weighted and self._sample_weighted() else 1
        try:
            self.quant = QuantizationParams.fit(
                config.secagg.ring_bits,
                config.secagg.clip,
                config.cohort,
                max_weight=max_weight,
                weighted=True,
            )
        except ConfigurationError as exc:
            raise FederationConfigError(f"secure-aggregation encoding: {exc}") from exc
        self.calibration: Calibration | None = None
        if config.dp is not None:
            dp = config.dp
            try:
                self.calibration = calibrate(
                    mechanism=dp.mechanism,
                    epsilon=dp.epsilon,
                    delta=dp.delta,
                    rounds=config.rounds,
                    sampling_rate=config.sampling_rate,
                    expected_cohort=config.cohort,
                    # Sized for the fewest contributors a round can release.
                    dropouts=config.cohort - self.graph.threshold,
                    ring_bits=dp.ring_bits,
                    clip=dp.clip,
                    dim=size,
                    seed=os.urandom(32),
                )
            except ConfigurationError as exc:
                raise FederationConfigError(f"DP calibration: {exc}") from exc

    def _sample_weighted(self) -> bool:
        return self.strategy.client_weight(2) != self.strategy.client_weight(1)

    def describe(self) -> dict[str, Any]:
        """The public parameters of the run, for ``run.json``."""
        q = self.quant
        out: dict[str, Any] = {
            "institutions": list(self.config.clients),
            "rounds": self.config.rounds,
            "cohort_size": self.config.cohort,
            "sampling_rate": self.config.sampling_rate,
            "strategy": self.strategy.name,
            "strategy_hparams": dict(self.config.strategy_hparams),
            "seed": self.config.seed,
            "dim": self.dim,
            "contribution_size": self.strategy.contribution_size(),
            "secagg": {
                "protocol": "SecAgg+" if self.graph.neighbours is not None else "SecAgg",
                "ring_bits": q.ring_bits
                if self.calibration is None
                else self.calibration.params.ring_bits,
                "threshold": self.graph.threshold,
                "neighbours": self.graph.neighbours,
                "corrupt_fraction": self.config.secagg.corrupt_fraction,
                "dropout_fraction": self.config.secagg.dropout_fraction,
                "key_agreement": "X25519 (32-byte public keys)",
                "signatures": "Ed25519 (64-byte signatures)",
                "share_encryption": "AES-256-GCM",
                "mask_prg": "AES-128-CTR",
                "secret_sharing": "Shamir over GF(2^256 + 297)",
                "session_id": "fresh os.urandom(32) per round",
            },
        }
        if self.calibration is None:
            out["secagg"]["encoding"] = {
                "clip_per_coordinate": q.clip,
                "scale": q.scale,
                "step": q.step,
                "max_weight": q.max_weight,
                "weighted": True,
            }
            out["dp"] = None
        else:
            out["dp"] = self.calibration.summary()
            out["dp"]["clip_l2"] = self.calibration.params.clip
        return out

    def run_round(self, round_index: int) -> RoundOutcome:
        begin = time.perf_counter()
        cohort = self.sampler.sample(round_index, self.config.clients)
        options = self.strategy.client_options()
        units: dict[int, np.ndarray] = {}
        weights: dict[int, int] = {}
        losses: list[float] = []
        for name in cohort:
            update = self.trainer.train(name, round_index, self.global_vector, options)
            contribution = self.strategy.contribution(
                update.delta, update.num_samples, update.control_delta
            )
            weight = self.strategy.client_weight(update.num_samples)
            uid = self.ids[name]
            # The encoder takes the unweighted vector and multiplies by the integer weight.
            units[uid] = contribution.astype(np.float64) / weight
            weights[uid] = 1 if self.calibration is not None else int(weight)
            losses.append(update.train_loss)
        trained = time.perf_counter()
        aggregate = self._secure_aggregate(round_index, units, weights)
        aggregated = time.perf_counter()
        self.global_vector = self.strategy.aggregate(self.global_vector, aggregate.agg)
        eval_loss = {k: float(v) for k, v in self.evaluator(self.global_vector).items()}
        names = {uid: name for name, uid in self.ids.items()}
        uploads = [aggregate.upload[u] for u in aggregate.contributors]
        dp_fields = None
        if self.calibration is not None and self.config.dp is not None:
            dp_fields = {
                **accounting_record(
                    self.calibration.params,
                    len(aggregate.contributors),
                    self.config.sampling_rate,
                ),
                "noise_multiplier": self.calibration.noise_multiplier,
                "delta": self.config.dp.delta,
                "epsilon_target": self.config.dp.epsilon,
            }
        metrics = RoundMetrics(
            round=round_index,
            cohort=cohort,
            contributors=tuple(names[u] for u in aggregate.contributors),
            train_loss=float(np.mean(losses)),
            eval_loss=eval_loss,
            eval_loss_mean=float(np.mean(list(eval_loss.values()))),
            round_s=time.perf_counter() - begin,
            train_s=trained - begin,
            aggregation_s=aggregated - trained,
            stage_s=aggregate.stage_s,
            client_mask_s=aggregate.mask_s,
            upload_bytes={
                "per_client_mean": float(np.mean(uploads)),
                "total": float(sum(aggregate.upload.values())),
            },
            secure_vs_plain_max_abs_diff=aggregate.diff,
            quantization_bound=aggregate.bound,
            clip_fraction=aggregate.clip_fraction,
            threshold=self.graph.threshold,
            neighbours=self.graph.neighbours,
            session_id=aggregate.transcript.session_id.hex(),
            dp=dp_fields,
        )
        return RoundOutcome(metrics, self.global_vector.copy(), aggregate.transcript)

    def _context(self, round_index: int) -> bytes:
        """What every client signs: the global model it trained from and the round number."""
        digest = hashlib.sha256(self.global_vector.tobytes()).digest()
        return digest + struct.pack(">Q", round_index)

    def _secure_aggregate(
        self, round_index: int, units: Mapping[int, np.ndarray], weights: Mapping[int, int]
    ) -> _Aggregate:
        cohort = tuple(sorted(units))
        encoder: DpEncoder | None = None
        clipped = 0.0
        inputs: dict[int, RingArray] = {}
        if self.calibration is not None:
            # A fresh public rotation seed per round, drawn before and independent of updates.
            encoder = DpEncoder(dataclasses.replace(self.calibration.params, seed=os.urandom(32)))
            for u in cohort:
                inputs[u] = encoder.encode(units[u])
                stats = encoder.last_stats
                clipped += 1.0 if stats is not None and stats.clipped else 0.0
            clip_fraction = clipped / len(cohort)
            ring_bits, dim = encoder.params.ring_bits, encoder.params.encoded_dim
        else:
            for u in cohort:
                encoded = encode(units[u], self.quant, weights[u])
                inputs[u] = encoded.vector
                clipped += encoded.clipped
            clip_fraction = clipped / (len(cohort) * self.strategy.contribution_size())
            ring_bits, dim = (
                self.quant.ring_bits,
                self.quant.encoded_dim(self.strategy.contribution_size()),
            )
        params = RoundParams(
            session_id=os.urandom(32),
            ring_bits=ring_bits,
            dim=dim,
            threshold=self.graph.threshold,
            cohort=cohort,
            neighbours=self.graph.neighbours,
            graph_seed=os.urandom(32),
        )
        context = self._context(round_index)
        sim = Simulation(params, inputs, contexts=dict.fromkeys(cohort, context)).run()
        contributors = sim.result.contributors
        if encoder is not None:
            total = encoder.decode_sum(sim.result.sum, len(contributors))
            agg = AggregateInput(total, float(len(contributors)), len(contributors))
            # The noise is part of the mechanism; what secure aggregation must reproduce
            # exactly is the plaintext ring sum of the same noised vectors.
            ring = params.ring
            plain_ring = ring.zeros(dim)
            for u in contributors:
                plain_ring = ring.reduce(plain_ring + inputs[u])
            plain = encoder.decode_sum(plain_ring, len(contributors))
            diff = float(np.max(np.abs(total.astype(np.float64) - plain)))
            bound = 0.0
        else:
            decoded = decode_sum(sim.result.sum, self.quant, len(contributors))
            clip = self.quant.clip
            reference = reference_sum(
                [weights[u] * np.clip(units[u], -clip, clip) for u in contributors],
                [float(weights[u]) for u in contributors],
            )
            if decoded.weight != reference.weight_sum:
                raise SecureAggregateMismatch(
                    f"secure weight sum {decoded.weight} != plaintext {reference.weight_sum}"
                )
            agg = AggregateInput(decoded.total, decoded.weight, len(contributors))
            secure_mean = decoded.total.astype(np.float64) / decoded.weight
            plain_mean = reference.contribution_sum / reference.weight_sum
            diff = float(np.max(np.abs(secure_mean - plain_mean)))
            bound = quantization_bound(
                self.quant,
                len(contributors),
                reference.weight_sum,
                float(np.max(np.abs(decoded.total))),
            )
        if diff > bound:
            raise SecureAggregateMismatch(
                f"round {round_index}: secure and plaintext aggregates differ by {diff:.3g}, "
                f"more than the encoding's bound {bound:.3g}"
            )
        return _Aggregate(
            agg=agg,
            contributors=contributors,
            transcript=sim.transcript,
            stage_s=sim.stage_seconds,
            mask_s=float(np.mean(list(sim.client_mask_seconds.values()))),
            upload=sim.upload_bytes,
            diff=diff,
            bound=bound,
            clip_fraction=clip_fraction,
        )

    def run(self, on_round: Callable[[RoundOutcome], None] | None = None) -> list[RoundOutcome]:
        """All rounds in order; ``on_round`` sees each outcome as soon as it exists."""
        outcomes = []
        for r in range(self.config.rounds):
            outcome = self.run_round(r)
            if on_round is not None:
                on_round(outcome)
            outcomes.append(outcome)
        return outcomes

"""The in-process federation: R rounds over N institutions, every aggregate a secure sum.

One round (:meth:`Federation.run_round`):

1. sample the cohort (:class:`~fl_core.sampling.ClientSampler`, deterministic in the seed);
2. each cohort member trains from the current global vector (a :class:`ClientTrainer`, which
   is where torch lives -- this module is numpy-only) and turns its update into the strategy's
   contribution;
3. the aggregation backend chosen by ``FederationConfig.backend`` (:mod:`fl_core.aggregation`)
   turns the contributions into one released sum, with a fresh ``os.urandom(32)`` session id:

   - ``masking`` (default): each contribution is encoded (:mod:`secagg.encoding`, or
     :mod:`secagg.dp.encoder` with distributed DP) and the cohort runs a full Bonawitz/SecAgg+
     session (:class:`secagg.simulate.Simulation`); the graph is a SecAgg+ Harary graph
     sized for an *active* server (:func:`~secagg.params.secaggplus_params` with
     ``semi_malicious_server=True``; its labels come from a seed the clients commit to and
     reveal in the session) when the cohort is large enough for one, the complete graph with
     the active-server :func:`~secagg.params.classic_threshold` otherwise, and every client
     checks both against its own policy (:class:`~secagg.protocol.ClientPolicy` with the
     federation's corrupt and dropout fractions). Each client signs a digest of the global
     vector it was given, so the session aborts if clients were served different models;
   - ``ckks``: every cohort member encrypts under the federation's CKKS key (dealt once per
     :class:`Federation`), the server adds under the public context, the lowest cohort id
     decrypts, only the sum of the claimed contributors' fresh uploads (:mod:`secagg.he.session`,
     the same sessions the deployment runs). Weaker trust model and no DP
     (:data:`~fl_core.aggregation.CKKS_TRUST_MODEL`); its release threshold is the same ``t``
     the masking backend would use;
4. the released sum is checked against the plaintext sum of the *same* client vectors
   (:func:`~fl_core.strategies.reference_sum`), see :func:`~fl_core.aggregation.quantization_bound`
   and :func:`~fl_core.aggregation.ckks_bound`;
5. the strategy turns the released aggregate into the next global vector, which is evaluated.

Weights travel inside the secure sum (weighted encoding: the weight is the last coordinate), so
the server learns only sums. With DP on, every client has weight 1 (a sample count is private
and unbounded, so it cannot scale a clipped contribution), the contribution is clipped in L2 and
noised by the client (:mod:`secagg.dp`), and the noise is calibrated for the fewest
contributors a round may release: the cohort less the dropouts tolerated
(``SecAggSettings.dropout_fraction``, at least the Shamir threshold,
:func:`~secagg.params.release_floor`). That floor is not assumed but enforced: every DP session
carries it as ``RoundParams.min_survivors``, and server and clients abort a round with fewer
contributors, so no release carries less noise than calibrated.

The DP target is an epsilon *against the server*, client-level with zero-out adjacency
(:mod:`secagg.dp.calibration`). Cohorts are drawn with a fixed size from the run's public seed,
so the server knows them and sampling amplifies nothing: the noise is calibrated for the most
rounds any one institution takes part in over the whole schedule (every round, when every
institution takes part in every round: the embedded default), each composed at full rate. That
count is enforced too: with DP on, a round that would put an institution's update into more
released sums than calibrated is refused (:class:`PrivacyBudgetExhausted`) before anyone trains.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fl_core.aggregation import (
    BACKENDS,
    AggregationBackend,
    CkksBackend,
    CkksRoundRecord,
    MaskingBackend,
    RoundContext,
)
from fl_core.aggregation import SecureAggregateMismatch as SecureAggregateMismatch
from fl_core.aggregation import quantization_bound as quantization_bound
from fl_core.errors import FLError
from fl_core.round import (
    EncodingSpec,
    calibrate_run,
    client_contribution,
    release_record,
    round_context,
)
from fl_core.sampling import ClientSampler
from fl_core.strategies import ClientOptions, Strategy, build_strategy
from fl_core.updates import check_finite
from secagg.dp.calibration import Calibration
from secagg.dp.noise import Mechanism
from secagg.errors import ConfigurationError
from secagg.params import SessionShape, release_floor, session_shape
from secagg.protocol import ClientPolicy
from secagg.transcript import Transcript


class FederationConfigError(FLError, ValueError):
    """Federation settings that cannot run (too few institutions, bad DP target, ...)."""


class PrivacyBudgetExhausted(FLError):
    """A DP round that would put an institution's update into more released sums than the
    noise was calibrated for: refused before anyone trains, nothing is released."""


@dataclass(frozen=True)
class ClientUpdate:
    """What one client's local training produced (never leaves the client unencoded)."""

    delta: np.ndarray  # trained - global, float32, over the trainable layout
    num_samples: int
    train_loss: float
    control_delta: np.ndarray | None = None  # SCAFFOLD only


class ClientTrainer(Protocol):
    """Local training of one institution, e.g. :class:`clients.simulation.TorchTrainer`."""

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
    backend: str = "masking"  # one of fl_core.aggregation.BACKENDS

    def __post_init__(self) -> None:
        check_backend(self.backend, dp_enabled=self.dp is not None)
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

    def schedule(self) -> tuple[tuple[str, ...], ...]:
        """Every round's cohort, as :class:`~fl_core.sampling.ClientSampler` draws it from the
        public seed: anyone who knows the seed knows them, the server included."""
        sampler = ClientSampler(self.seed, cohort_size=self.cohort)
        return tuple(sampler.sample(r, self.clients) for r in range(self.rounds))

    def participations(self) -> int:
        """The most rounds any one institution takes part in over :meth:`schedule`."""
        return max(Counter(name for cohort in self.schedule() for name in cohort).values())


def check_backend(backend: str, *, dp_enabled: bool) -> None:
    """Refuse an unknown backend, and DP with CKKS (the DP encoder is integer/ring-based)."""
    if backend not in BACKENDS:
        raise FederationConfigError(
            f"unknown aggregation backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if backend == "ckks" and dp_enabled:
        raise FederationConfigError(
            "distributed DP needs the masking backend: its noise is integer (Skellam or discrete "
            "Gaussian) and must be summed exactly in the ring Z_2^b, which CKKS's approximate "
            "arithmetic does not do; turn DP off or use the masking backend"
        )


def choose_graph(cohort: int, settings: SecAggSettings) -> SessionShape:
    """SecAgg+ (k, t) against an active server for a large cohort, else the complete graph and
    the active-server threshold floor((n + c)/2) + 1 (:func:`secagg.params.session_shape`)."""
    try:
        return session_shape(
            cohort, settings.corrupt_fraction, settings.dropout_fraction, sparse=True
        )
    except ConfigurationError as exc:
        raise FederationConfigError(str(exc)) from exc


@dataclass(frozen=True)
class RoundMetrics:
    """One line of ``metrics.jsonl``."""

    round: int
    backend: str  # which aggregation backend released this round's sum
    cohort: tuple[str, ...]
    contributors: tuple[str, ...]
    train_loss: float
    eval_loss: dict[str, float]
    eval_loss_mean: float
    round_s: float
    train_s: float
    aggregation_s: float
    stage_s: dict[str, float]
    # Mean per uploading client: building its masked input (all PRG expansions) under masking,
    # encrypting its update under CKKS.
    client_mask_s: float
    upload_bytes: dict[str, float]
    secure_vs_plain_max_abs_diff: float
    quantization_bound: float  # the backend's bound on that difference (CKKS: ckks_bound)
    clip_fraction: float
    threshold: int  # the Shamir threshold t (CKKS: min_contributors)
    min_release: int  # fewest contributors the release could have had: max(t, DP floor)
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
    #: The server's record of the round: the masking protocol's transcript, or what the CKKS
    #: server received and added.
    transcript: Transcript | CkksRoundRecord


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
        self.calibration: Calibration | None = None
        #: The fewest contributors a round may release: t, the signature quorum, and with DP the
        #: floor the noise is calibrated for.
        self.min_release = self.graph.min_release
        #: Released sums each institution's update is in so far (enforced against the DP
        #: calibration's ``participations``).
        self.contributions: Counter[str] = Counter()
        self.backend: AggregationBackend
        if config.backend == CkksBackend.name:
            try:
                self.backend = CkksBackend.for_federation(
                    sorted(self.ids.values()),
                    config.secagg.clip,
                    config.cohort,
                    max_weight,
                    self.graph.threshold,
                    size,
                )
            except ConfigurationError as exc:
                raise FederationConfigError(f"CKKS parameters: {exc}") from exc
            return
        encoding = EncodingSpec(size, config.secagg.ring_bits, config.secagg.clip, max_weight)
        try:
            encoding.codec(config.cohort)  # refuses a ring too small for the cohort's sum
        except ConfigurationError as exc:
            raise FederationConfigError(f"secure-aggregation encoding: {exc}") from exc
        if config.dp is not None:
            dp = config.dp
            self.min_release = release_floor(
                config.cohort, self.graph.min_release, config.secagg.dropout_fraction
            )
            try:
                self.calibration = calibrate_run(
                    dp,
                    participations=config.participations(),
                    cohort=config.cohort,
                    floor=self.min_release,
                    contribution_size=size,
                )
            except ConfigurationError as exc:
                raise FederationConfigError(f"DP calibration: {exc}") from exc
            encoding = dataclasses.replace(encoding, dp=self.calibration.params)
        self.backend = MaskingBackend(
            encoding,
            self.graph,
            config.secagg.corrupt_fraction,
            config.secagg.dropout_fraction,
            min_survivors=0 if self.calibration is None else self.min_release,
        )

    def _sample_weighted(self) -> bool:
        return self.strategy.client_weight(2) != self.strategy.client_weight(1)

    def describe(self) -> dict[str, Any]:
        """The public parameters of the run, for ``run.json``."""
        out: dict[str, Any] = {
            "institutions": list(self.config.clients),
            "rounds": self.config.rounds,
            "cohort_size": self.config.cohort,
            "sampling": {
                "scheme": "fixed-size",
                "coins": "public (the run's seed)",
                "rounds_per_institution_max": self.config.participations(),
            },
            "strategy": self.strategy.name,
            "strategy_hparams": dict(self.config.strategy_hparams),
            "seed": self.config.seed,
            "dim": self.dim,
            "contribution_size": self.strategy.contribution_size(),
            **self.backend.describe(),
        }
        if self.calibration is None:
            out["dp"] = None
        else:
            out["dp"] = self.calibration.summary()
            out["dp"]["clip_l2"] = self.calibration.params.clip
        return out

    def run_round(self, round_index: int, dropouts: Collection[str] = ()) -> RoundOutcome:
        """One round. ``dropouts`` (institution names) train but never upload: the round goes
        on with the others, or raises :class:`~secagg.errors.TooFewSurvivors` and releases
        nothing when fewer than :attr:`min_release` remain (the threshold, or with DP the
        contributor count the noise was calibrated for)."""
        unknown = set(dropouts) - set(self.ids)
        if unknown:
            raise FederationConfigError(f"unknown institutions in dropouts: {sorted(unknown)}")
        begin = time.perf_counter()
        cohort = self.sampler.sample(round_index, self.config.clients)
        self._check_budget(cohort)
        options = self.strategy.client_options()
        units: dict[int, np.ndarray] = {}
        weights: dict[int, int] = {}
        losses: list[float] = []
        for name in cohort:
            update = self.trainer.train(name, round_index, self.global_vector, options)
            uid = self.ids[name]
            # Every backend takes the unweighted vector and multiplies by the integer weight.
            units[uid], weights[uid] = client_contribution(
                self.strategy,
                update.delta,
                update.num_samples,
                update.control_delta,
                dp=self.calibration is not None,
            )
            losses.append(update.train_loss)
        trained = time.perf_counter()
        context = RoundContext(
            round_index,
            round_context(round_index, self.global_vector, options),
            frozenset(self.ids[name] for name in dropouts if name in cohort),
        )
        aggregate = self.backend.aggregate(units, weights, context)
        aggregated = time.perf_counter()
        self.global_vector = self.strategy.aggregate(self.global_vector, aggregate.agg)
        eval_loss = {k: float(v) for k, v in self.evaluator(self.global_vector).items()}
        names = {uid: name for name, uid in self.ids.items()}
        self.contributions.update(names[u] for u in aggregate.contributors)
        uploads = [aggregate.upload[u] for u in aggregate.contributors]
        dp_fields = None
        if self.calibration is not None and self.config.dp is not None:
            dp_fields = release_record(
                self.calibration,
                len(aggregate.contributors),
                self.config.dp.delta,
                self.config.dp.epsilon,
            )
        metrics = RoundMetrics(
            round=round_index,
            backend=self.backend.name,
            cohort=cohort,
            contributors=tuple(names[u] for u in aggregate.contributors),
            train_loss=float(np.mean(losses)),
            eval_loss=eval_loss,
            eval_loss_mean=float(np.mean(list(eval_loss.values()))),
            round_s=time.perf_counter() - begin,
            train_s=trained - begin,
            aggregation_s=aggregated - trained,
            stage_s=aggregate.stage_s,
            client_mask_s=aggregate.client_s,
            upload_bytes={
                "per_client_mean": float(np.mean(uploads)),
                "total": float(sum(aggregate.upload.values())),
            },
            secure_vs_plain_max_abs_diff=aggregate.diff,
            quantization_bound=aggregate.bound,
            clip_fraction=aggregate.clip_fraction,
            threshold=self.graph.threshold,
            min_release=self.min_release,
            neighbours=self.backend.neighbours,
            session_id=aggregate.session_id.hex(),
            dp=dp_fields,
        )
        return RoundOutcome(metrics, self.global_vector.copy(), aggregate.record)

    def _check_budget(self, cohort: tuple[str, ...]) -> None:
        """With DP, refuse a round that would exceed an institution's calibrated count."""
        if self.calibration is None:
            return
        most = self.calibration.participations
        spent = sorted(n for n in cohort if self.contributions[n] >= most)
        if spent:
            raise PrivacyBudgetExhausted(
                f"institutions {spent} are already in {most} released sums, the most the DP "
                f"noise was calibrated for (epsilon {self.calibration.epsilon:.4g} against the "
                "server); another round with them would exceed it"
            )

    def run(
        self, on_round: Callable[[RoundOutcome], None] | None = None, start: int = 0
    ) -> list[RoundOutcome]:
        """Rounds ``start`` .. rounds - 1 in order (``start`` > 0 continues a run whose global
        vector and strategy state were restored); ``on_round`` sees each outcome as it exists."""
        if not 0 <= start <= self.config.rounds:
            raise FederationConfigError(f"start round {start} outside 0..{self.config.rounds}")
        outcomes = []
        for r in range(start, self.config.rounds):
            outcome = self.run_round(r)
            if on_round is not None:
                on_round(outcome)
            outcomes.append(outcome)
        return outcomes

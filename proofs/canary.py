"""Canary audit: plant secrets in one institution's data, train federated, measure exposure.

Following Carlini et al., "The Secret Sharer" (USENIX Security'19): a canary is a sentence with
a random secret ("The access code of Ilse Varga is 4821."), inserted ``repeats`` times into the
training data of one institution only. After federated training with secure aggregation (and,
in the second arm, distributed DP), each canary is scored against ``references`` candidates
that differ only in the secret, drawn uniformly from the same space. Its *exposure* is
``log2(references + 1) - log2(1 + #candidates the model likes at least as much)`` -- Carlini's
rank-based exposure, estimated from a uniform sample of the secret space instead of the whole
space, so it ranges from 0 to ``log2(references + 1)``.

Empirical epsilon lower bound. Let E_c be "at most c candidates score at least as well as the
canary". If the canary institution's update were replaced by zero (it still adds its noise),
the model would be independent of the secret, so the canary and its candidates would be
exchangeable: P_out(E_c) <= (c+1)/(references+1) (ties count against the canary). Client-level
(epsilon, delta)-DP with the zero-out relation the accountant uses
(:mod:`secagg.dp.calibration`) gives P_in(E_c) <= e^epsilon * P_out(E_c) + delta, hence

    epsilon >= ln((P_in(E_c) - delta) * (references + 1) / (c + 1)).

P_in(E_c) is bounded from below by a one-sided Clopper-Pearson interval on the fraction of
canaries for which E_c held, at the stated confidence split over the thresholds tried
(Bonferroni). That treats the canaries of one run as independent trials, as one-run audits do;
the bound is evidence, not a certificate. It is reported next to the accountant's epsilon,
which it must never exceed; a wide gap says the accounting is loose or the attack weak.

The secrets are excluded from the tokenizer's training corpus: BPE merges learned on them would
leak them through the vocabulary, whatever the training did.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import beta as beta_distribution

from clients.data import IGNORE_INDEX, AlpacaRecord, TokenizedDataset, alpaca_example, tokenize
from clients.model_factory import TinyLlamaSpec, build_default_base, build_tiny_llama
from clients.synthetic import make_federation
from clients.trainer import LoraModel, LoraSettings, TrainSettings, train_local
from fl_core.strategies import AggregateInput, FedAvg
from proofs.accountant import RdpAccountant
from secagg.dp.calibration import calibrate, release_event
from secagg.dp.encoder import DpEncoder
from secagg.encoding import QuantizationParams, decode_sum, encode
from secagg.errors import ConfigurationError
from secagg.params import session_shape
from secagg.protocol import RoundParams
from secagg.ring import RingArray
from secagg.simulate import simulate_round

FloatArray = npt.NDArray[np.float64]

_FIRST_NAMES = ("Ilse", "Tomas", "Reza", "Amara", "Kenji", "Lucia", "Oskar", "Nadia", "Femi")
_LAST_NAMES = ("Varga", "Lindqvist", "Okafor", "Moreau", "Tanaka", "Rossi", "Kowalski", "Haddad")


# --- canaries and exposure ---------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    name: str
    secret: str

    def record(self, secret: str | None = None) -> AlpacaRecord:
        """The canary sentence, or the same sentence with another candidate secret."""
        value = self.secret if secret is None else secret
        return AlpacaRecord(
            f"What is the access code of {self.name}?",
            "",
            f"The access code of {self.name} is {value}.",
        )


def make_canaries(count: int, digits: int, rng: random.Random) -> tuple[Canary, ...]:
    """``count`` canaries with distinct names and uniformly random ``digits``-digit secrets."""
    names = [f"{first} {last}" for first in _FIRST_NAMES for last in _LAST_NAMES]
    if not 1 <= count <= len(names):
        raise ConfigurationError(f"canary count must be in [1, {len(names)}], got {count}")
    if not 1 <= digits <= 18:
        raise ConfigurationError(f"canary secrets must have 1 to 18 digits, got {digits}")
    chosen = rng.sample(names, count)
    return tuple(Canary(name, random_secret(digits, rng)) for name in chosen)


def random_secret(digits: int, rng: random.Random) -> str:
    return f"{rng.randrange(10**digits):0{digits}d}"


@dataclass(frozen=True)
class Exposure:
    """Per canary: how many of the ``references`` candidates scored at least as well."""

    references: int
    at_least_as_good: tuple[int, ...]

    @property
    def exposures(self) -> tuple[float, ...]:
        top = math.log2(self.references + 1)
        return tuple(top - math.log2(1 + count) for count in self.at_least_as_good)

    @property
    def mean(self) -> float:
        return float(np.mean(self.exposures))

    @property
    def max(self) -> float:
        return float(np.max(self.exposures))

    @property
    def ceiling(self) -> float:
        """The largest exposure this many references can show."""
        return math.log2(self.references + 1)


def exposure_from_losses(canary_losses: FloatArray, reference_losses: FloatArray) -> Exposure:
    """Rank each canary's loss (shape (k,)) among its candidates' losses (shape (k, m))."""
    if canary_losses.ndim != 1 or reference_losses.ndim != 2:
        raise ConfigurationError("need canary losses of shape (k,) and references of (k, m)")
    if reference_losses.shape[0] != canary_losses.shape[0] or reference_losses.shape[1] < 1:
        raise ConfigurationError(
            f"{canary_losses.shape[0]} canaries but reference losses of shape "
            f"{reference_losses.shape}"
        )
    # Ties count against the canary: the exchangeability bound needs the conservative side.
    counts = (reference_losses <= canary_losses[:, None]).sum(axis=1)
    return Exposure(int(reference_losses.shape[1]), tuple(int(c) for c in counts))


@dataclass(frozen=True)
class EpsilonLowerBound:
    epsilon: float  # 0 when no threshold gives evidence of leakage
    threshold: int | None  # the c that gave it
    hits: int  # canaries with at most c candidates at least as good
    canaries: int
    p_in_lower: float  # Clopper-Pearson lower bound on P_in(E_c)
    p_out_upper: float  # (c+1)/(m+1)
    confidence: float


#: Thresholds c tried for the event "at most c candidates score at least as well".
DEFAULT_THRESHOLDS = (0, 1, 3, 7)


def clopper_pearson_lower(hits: int, trials: int, alpha: float) -> float:
    """One-sided lower confidence bound, level 1 - alpha, on a binomial proportion."""
    if not 0 <= hits <= trials or trials < 1:
        raise ConfigurationError(f"need 0 <= hits <= trials and trials >= 1: {hits}/{trials}")
    if hits == 0:
        return 0.0
    return float(beta_distribution.ppf(alpha, hits, trials - hits + 1))


def epsilon_lower_bound(
    exposure: Exposure,
    delta: float,
    confidence: float = 0.95,
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
) -> EpsilonLowerBound:
    """The largest epsilon the canary ranks prove, at ``confidence`` (see module docstring)."""
    if not 0 < confidence < 1 or not 0 <= delta < 1:
        raise ConfigurationError("need 0 < confidence < 1 and 0 <= delta < 1")
    usable = [c for c in thresholds if 0 <= c < exposure.references]
    if not usable:
        raise ConfigurationError(
            f"no threshold in {tuple(thresholds)} is below the {exposure.references} references"
        )
    alpha = (1 - confidence) / len(usable)
    k = len(exposure.at_least_as_good)
    best = EpsilonLowerBound(0.0, None, 0, k, 0.0, 1.0, confidence)
    for c in usable:
        hits = sum(1 for count in exposure.at_least_as_good if count <= c)
        p_in = clopper_pearson_lower(hits, k, alpha)
        p_out = (c + 1) / (exposure.references + 1)
        if p_in - delta <= 0:
            continue
        eps = math.log((p_in - delta) / p_out)
        if eps > best.epsilon:
            best = EpsilonLowerBound(eps, c, hits, k, p_in, p_out, confidence)
    return best


@torch.no_grad()
def response_losses(
    lm: LoraModel, vector: npt.NDArray[np.float32], data: TokenizedDataset, pad_id: int
) -> FloatArray:
    """Summed next-token loss of each example's response tokens (its negative log-likelihood)."""
    lm.set_vector(vector)
    lm.model.eval()
    out: list[FloatArray] = []
    batch = 64
    for at in range(0, len(data), batch):
        rows = range(at, min(at + batch, len(data)))
        width = max(len(data.input_ids[i]) for i in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            n = len(data.input_ids[i])
            ids[r, :n], labels[r, :n], mask[r, :n] = data.input_ids[i], data.labels[i], 1
        logits = lm.model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits[:, :-1]
        token_losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2),
            torch.from_numpy(labels[:, 1:]),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        out.append(token_losses.sum(dim=1).double().numpy())
    return np.concatenate(out)


# --- the audit ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryAuditConfig:
    """One canary audit: a small federation, the canaries, and the DP arm's parameters."""

    # Defaults chosen so that training without DP does memorise the canaries (mean exposure
    # about 4.6 of 6 bits); with 4 rounds of 12 steps the tiny model stayed at chance level.
    institutions: int = 3
    records_per_institution: int = 64
    rounds: int = 5
    local_steps: int = 40
    batch_size: int = 16
    lr: float = 2e-2
    canaries: int = 16
    repeats: int = 16
    digits: int = 4
    references: int = 63
    # DP arm: clip (L2, in update units) and the (epsilon, delta) the noise is calibrated for.
    clip: float = 0.5
    target_epsilon: float = 8.0
    delta: float = 1e-5
    confidence: float = 0.95
    ring_bits: int = 32
    model: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)
    lora_rank: int = 8
    max_length: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.institutions < 2:
            raise ConfigurationError("a federation needs at least 2 institutions")
        if self.rounds < 1 or self.repeats < 1 or self.references < 1:
            raise ConfigurationError("rounds, repeats and references must be at least 1")
        if not self.target_epsilon > 0 or not self.clip > 0:
            raise ConfigurationError("the DP arm needs a positive clip and target epsilon")


@dataclass(frozen=True)
class ArmResult:
    """One training run: exposure of the canaries and the two epsilons."""

    dp: bool
    exposure: Exposure
    lower_bound: EpsilonLowerBound
    epsilon_accountant: float  # math.inf without DP
    final_train_loss: float

    def to_dict(self) -> dict[str, object]:
        return {
            "dp": self.dp,
            "mean_exposure": self.exposure.mean,
            "max_exposure": self.exposure.max,
            "exposure_ceiling": self.exposure.ceiling,
            "at_least_as_good": list(self.exposure.at_least_as_good),
            "epsilon_lower_bound": self.lower_bound.epsilon,
            "lower_bound": asdict(self.lower_bound),
            "epsilon_accountant": None
            if math.isinf(self.epsilon_accountant)
            else self.epsilon_accountant,
            "final_train_loss": self.final_train_loss,
        }


@dataclass(frozen=True)
class CanaryAuditReport:
    config: CanaryAuditConfig
    without_dp: ArmResult
    with_dp: ArmResult

    @property
    def consistent(self) -> bool:
        """The empirical lower bound never exceeds the accountant's epsilon."""
        return all(
            arm.lower_bound.epsilon <= arm.epsilon_accountant
            for arm in (self.without_dp, self.with_dp)
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "without_dp": self.without_dp.to_dict(),
            "with_dp": self.with_dp.to_dict(),
            "consistent": self.consistent,
            "config": {k: v for k, v in asdict(self.config).items() if k != "model"},
        }


class _Federation:
    """The institutions' tokenized data, the canaries, and a fresh model per training run."""

    def __init__(self, config: CanaryAuditConfig) -> None:
        self.config = config
        federation = make_federation(
            config.institutions, config.records_per_institution, seed=config.seed
        )
        # The tokenizer never sees the secrets (see the module docstring).
        _, self.tokenizer = build_default_base(federation.corpus(), config.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        rng = secrets.SystemRandom()
        self.canaries = make_canaries(config.canaries, config.digits, rng)
        planted = [c.record() for c in self.canaries] * config.repeats
        self.datasets = []
        for index, institution in enumerate(federation.institutions):
            records = list(institution.records) + (planted if index == 0 else [])
            self.datasets.append(self._tokenize(records, institution.name))
        candidates = [
            c.record(random_secret(config.digits, rng))
            for c in self.canaries
            for _ in range(config.references)
        ]
        self.canary_data = self._tokenize([c.record() for c in self.canaries], "canaries")
        self.reference_data = self._tokenize(candidates, "canary candidates")

    def _tokenize(self, records: Sequence[AlpacaRecord], name: str) -> TokenizedDataset:
        examples = [alpaca_example(r) for r in records]
        return tokenize(examples, self.tokenizer, self.config.max_length, name)

    def fresh_model(self) -> LoraModel:
        # The same seeded base for every run (PEFT wraps the base in place, so never reuse one).
        base = build_tiny_llama(len(self.tokenizer), self.config.model)
        settings = LoraSettings(rank=self.config.lora_rank, init_seed=self.config.seed)
        return LoraModel(base, settings)


def _secure_sum(encoded: Sequence[RingArray], ring_bits: int, dim: int) -> tuple[RingArray, int]:
    cohort = tuple(range(1, len(encoded) + 1))
    params = RoundParams(
        os.urandom(32), ring_bits, dim, session_shape(len(cohort)).threshold, cohort
    )
    result = simulate_round(params, dict(zip(cohort, encoded, strict=True))).result
    return result.sum, len(result.contributors)


def _train(
    fed: _Federation, lm: LoraModel, dp: bool
) -> tuple[npt.NDArray[np.float32], float, float]:
    """Federated training through secure aggregation; (final global vector, last mean training
    loss, epsilon spent by the accountant -- infinite without DP)."""
    config = fed.config
    dim = lm.layout.size
    strategy = FedAvg(dim)
    global_vector = lm.get_vector()
    n = len(fed.datasets)
    loss = math.nan
    accountant = RdpAccountant()
    calibration = None
    if dp:
        calibration = calibrate(
            mechanism="skellam",
            epsilon=config.target_epsilon,
            delta=config.delta,
            participations=config.rounds,  # every institution takes part in every round
            expected_cohort=n,
            dropouts=0,
            ring_bits=config.ring_bits,
            clip=config.clip,
            dim=dim,
            seed=os.urandom(32),
        )
    for rnd in range(config.rounds):
        deltas = []
        losses = []
        for index, data in enumerate(fed.datasets):
            settings = TrainSettings(
                local_steps=config.local_steps,
                batch_size=config.batch_size,
                lr=config.lr,
                seed=config.seed * 1000 + rnd * 100 + index,
            )
            result = train_local(lm, global_vector, data, settings, fed.pad_id)
            deltas.append(result.delta)
            losses.append(result.mean_loss)
        loss = float(np.mean(losses))
        if calibration is not None:
            # A fresh public rotation seed per round, independent of the updates.
            params = dataclasses.replace(calibration.params, seed=os.urandom(32))
            encoder = DpEncoder(params)
            summed, contributors = _secure_sum(
                [encoder.encode(d) for d in deltas], config.ring_bits, params.encoded_dim
            )
            total = encoder.decode_sum(summed, contributors)
            # Accounted exactly as `fedsec audit` accounts a run's metrics records.
            event = release_event(params, contributors)
            if event is None:
                raise ConfigurationError("the DP round produced no privacy event")
            accountant.compose(event)
        else:
            quant = QuantizationParams.fit(config.ring_bits, clip=_max_abs(deltas), max_clients=n)
            summed, contributors = _secure_sum(
                [encode(d, quant).vector for d in deltas], config.ring_bits, dim
            )
            total = decode_sum(summed, quant, contributors).total
        global_vector = strategy.aggregate(
            global_vector, AggregateInput(total, float(contributors), contributors)
        )
    epsilon = accountant.get_epsilon(config.delta) if calibration is not None else math.inf
    return global_vector, loss, epsilon


def _max_abs(deltas: Sequence[npt.NDArray[np.float32]]) -> float:
    # Without DP the quantizer's clip only has to avoid clipping anything: it is not a privacy
    # parameter there, and clipping would blur the comparison between the arms.
    return max(float(np.max(np.abs(d))) for d in deltas) or 1.0


def _arm(fed: _Federation, dp: bool) -> ArmResult:
    config = fed.config
    lm = fed.fresh_model()
    vector, loss, eps = _train(fed, lm, dp)
    canary = response_losses(lm, vector, fed.canary_data, fed.pad_id)
    refs = response_losses(lm, vector, fed.reference_data, fed.pad_id)
    exposure = exposure_from_losses(canary, refs.reshape(len(fed.canaries), config.references))
    bound = epsilon_lower_bound(exposure, config.delta, config.confidence)
    return ArmResult(dp, exposure, bound, eps, loss)


def run_canary_audit(config: CanaryAuditConfig | None = None) -> CanaryAuditReport:
    """Train the same federation twice, without and with DP, and audit the canaries."""
    config = config or CanaryAuditConfig()
    fed = _Federation(config)
    return CanaryAuditReport(config, _arm(fed, dp=False), _arm(fed, dp=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the default audit and print one JSON line (about 10 CPU-minutes)."""
    parser = argparse.ArgumentParser(prog="python -m proofs.canary", description=__doc__)
    parser.add_argument("--rounds", type=int, default=CanaryAuditConfig.rounds)
    parser.add_argument(
        "--epsilon",
        type=float,
        default=CanaryAuditConfig.target_epsilon,
        help="epsilon the DP arm's noise is calibrated for",
    )
    parser.add_argument("--canaries", type=int, default=CanaryAuditConfig.canaries)
    args = parser.parse_args(argv)
    config = CanaryAuditConfig(
        rounds=args.rounds, target_epsilon=args.epsilon, canaries=args.canaries
    )
    report = run_canary_audit(config)
    print(json.dumps(report.to_dict()))
    return 0 if report.consistent else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Federated (secure aggregation) vs each institution alone vs pooled training, judged on every
institution's own held-out data: one JSON line.

N institutions of the embedded non-IID task (:mod:`clients.synthetic`), on a real pretrained
base when the optional extra is installed (``--model smollm2-135m``, the default then) and on the
embedded random-init tiny Llama otherwise (the JSON says which, and why). From the same base and
the same initial adapter, every arm gets **the same compute per institution** (R*K optimiser
steps of B examples each):

* ``federated``: R rounds of K local steps per institution under secure aggregation. Embedded
  default: FedAdam (Reddi et al., ICLR'21) over R=80 rounds of K=1 plain-SGD step (client lr
  1.0, server tau 1e-6: the server's Adam sees the clipped gradient unscaled; its state
  persists across rounds). Pretrained default: ``fedsec simulate``'s recipe, FedAvg over AdamW
  clients, R=5 rounds of K=4 steps.
* ``federated_fedavg`` (embedded only by default): ``fedsec simulate``'s own recipe (FedAvg,
  AdamW clients, ``--fedavg-local-steps`` local steps, R*K/that rounds).
* ``isolated:<institution>``: that institution alone, R*K steps of batch B on its own data.
* ``centralized``: the pooled data of all institutions, R*K steps of batch N*B (the examples one
  federated round-step processes across the institutions, as many sequential steps).
* ``centralized_sequential`` (embedded only by default): the pooled data, N*R*K steps of batch
  B; N times the sequential depth, so not the same-compute baseline, but reported.

Evaluation is per institution: each institution's own held-out set (drawn like its training
data: 90% its own domain) is halved into a validation and a test half. An arm's learning rate is
chosen on validation: each ``isolated`` arm on its own institution's validation half (what it
could do alone), the shared arms on the union of the validation halves. Each model is then
scored on **every institution's own test half**, and the per-institution table says whether the
federated model beats that institution's model trained alone, on that institution's data, and
how both compare with centralized training. Beside the loss: greedy answers to the first
``--generate`` test questions of each institution, scored by exact match and ROUGE-L.

Every figure is the mean over ``--seeds`` training seeds (data order, LoRA dropout and, for the
federated arms, the secure randomness); per-(arm, rate) means and per-seed runs are under
``grid``. ``secagg_overhead_fraction``: encoding, the full protocol for every client and the
server, and decoding, over training plus aggregation time of the federated arm's rounds.

    .venv/bin/python benchmarks/fl_vs_isolated.py [--model embedded|smollm2-135m]
        [--lrs ...] [--seeds N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from clients import defaults
from clients.data import TokenizedDataset
from clients.generation import answer_questions
from clients.model_factory import named_model_available
from clients.simulation import TorchTrainer, default_clip, prepare
from clients.trainer import TrainSettings, evaluate, train_local
from clients.workload import SimulationSpec, Workload
from fl_core import recipe as recipes
from fl_core.federation import Federation, FederationConfig, RoundOutcome, SecAggSettings
from fl_core.strategies import STRATEGIES

#: Strategies whose server step is Adam-like: the tuned rate is the server's eta.
ADAPTIVE = frozenset({"fedadam", "fedyogi", "fedadagrad"})
Optimizer = Literal["adamw", "sgd"]


class BudgetError(ValueError):
    """Benchmark settings under which the arms cannot get the same compute."""


@dataclass(frozen=True)
class Arm:
    """One non-federated arm's training run: ``steps`` sequential steps of ``batch_size``."""

    steps: int
    batch_size: int

    @property
    def examples(self) -> int:
        return self.steps * self.batch_size


@dataclass(frozen=True)
class Budget:
    """The compute of every arm, derived from the federation's N, R, K and B."""

    institutions: int
    rounds: int
    local_steps: int
    batch_size: int
    fedavg_local_steps: int

    def __post_init__(self) -> None:
        for name in ("institutions", "rounds", "local_steps", "batch_size", "fedavg_local_steps"):
            if getattr(self, name) < 1:
                raise BudgetError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_institution % self.fedavg_local_steps:
            raise BudgetError(
                f"FedAvg's {self.fedavg_local_steps} local steps do not divide the "
                f"{self.steps_per_institution} steps per institution (rounds x local steps)"
            )

    @property
    def steps_per_institution(self) -> int:
        return self.rounds * self.local_steps

    @property
    def fedavg_rounds(self) -> int:
        return self.steps_per_institution // self.fedavg_local_steps

    @property
    def federation_examples(self) -> int:
        """Examples the whole federation trains on (all institutions, all rounds)."""
        return self.institutions * self.steps_per_institution * self.batch_size

    @property
    def isolated(self) -> Arm:
        return Arm(self.steps_per_institution, self.batch_size)

    @property
    def centralized(self) -> Arm:
        return Arm(self.steps_per_institution, self.institutions * self.batch_size)

    @property
    def centralized_sequential(self) -> Arm:
        return Arm(self.institutions * self.steps_per_institution, self.batch_size)


def union(sets: Mapping[str, TokenizedDataset]) -> TokenizedDataset:
    ids = tuple(x for s in sets.values() for x in s.input_ids)
    labels = tuple(x for s in sets.values() for x in s.labels)
    return TokenizedDataset(ids, labels, sum(s.truncated for s in sets.values()))


def split_own(
    sets: Mapping[str, TokenizedDataset],
) -> tuple[dict[str, TokenizedDataset], dict[str, TokenizedDataset]]:
    """(validation, test): the first and second half of every institution's own held-out set
    (drawn i.i.d. from that institution's distribution, so the halves are two samples of it)."""
    val: dict[str, TokenizedDataset] = {}
    test: dict[str, TokenizedDataset] = {}
    for name, data in sets.items():
        if len(data) < 2:
            raise BudgetError(f"eval set {name} has {len(data)} record(s); need 2 to split")
        half = len(data) // 2
        val[name] = data.subset(range(half))
        test[name] = data.subset(range(half, len(data)))
    return val, test


def split_eval(sets: Mapping[str, TokenizedDataset]) -> tuple[TokenizedDataset, TokenizedDataset]:
    """The union of the validation halves and of the test halves (:func:`split_own`)."""
    val, test = split_own(sets)
    return union(val), union(test)


@dataclass(frozen=True)
class Scored:
    """Validation loss (what the rate is chosen on), pooled test loss, and the test loss on each
    institution's own test half (``own``); a mean over seeds keeps the per-seed (val, test) in
    ``runs``."""

    val: float
    test: float
    runs: tuple[tuple[float, float], ...] = ()
    own: Mapping[str, float] = field(default_factory=dict)


def mean_scored(scores: Sequence[Scored]) -> Scored:
    if not scores:
        raise BudgetError("no runs to average")
    return Scored(
        float(np.mean([s.val for s in scores])),
        float(np.mean([s.test for s in scores])),
        tuple((s.val, s.test) for s in scores),
        {k: float(np.mean([s.own[k] for s in scores])) for k in scores[0].own},
    )


@dataclass(frozen=True)
class FederatedRun:
    vector: np.ndarray
    outcomes: list[RoundOutcome]


@dataclass(frozen=True)
class FederatedRecipe:
    strategy: str
    rounds: int
    local_steps: int
    optimizer: Optimizer
    client_lr: float | None  # None: the tuned rate is the client lr
    tau: float


def train_alone(
    work: Workload,
    start: np.ndarray,
    data: TokenizedDataset,
    arm: Arm,
    lr: float,
    seed: int,
    threads: int,
) -> np.ndarray:
    settings = TrainSettings(
        local_steps=arm.steps, batch_size=arm.batch_size, lr=lr, seed=seed, num_threads=threads
    )
    result = train_local(work.lm, start, data, settings, work.pad_id)
    trained: np.ndarray = (start + result.delta).astype(np.float32)
    return trained


def train_federated(
    work: Workload,
    start: np.ndarray,
    recipe: FederatedRecipe,
    lr: float,
    batch_size: int,
    seed: int,
    threads: int,
) -> FederatedRun:
    """One federation under secure aggregation (``clients.simulation``'s trainer and config)."""
    adaptive = recipe.strategy in ADAPTIVE
    client_lr = lr if recipe.client_lr is None else recipe.client_lr
    settings = TrainSettings(
        local_steps=recipe.local_steps,
        batch_size=batch_size,
        lr=client_lr,
        optimizer=recipe.optimizer,
        seed=seed,
        num_threads=threads,
    )
    hparams: dict[str, object] = {"eta": lr, "tau": recipe.tau} if adaptive else {}
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=recipe.rounds,
        secagg=SecAggSettings(clip=default_clip(settings, recipe.strategy)),
        strategy=recipe.strategy,
        strategy_hparams=hparams,
        seed=seed,
    )
    max_samples = max(len(d) for d in work.train_sets.values())
    # No per-round evaluation: it is not part of a round and would only slow the benchmark.
    trainer = TorchTrainer(work, settings, seed)
    fed = Federation(config, trainer, lambda _vector: {}, start.copy(), max_samples)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        outcomes = fed.run()
    return FederatedRun(fed.global_vector.copy(), outcomes)


def tune(
    lrs: Sequence[float],
    seeds: Sequence[int],
    run: Callable[[float, int], np.ndarray],
    score: Callable[[np.ndarray], Scored],
) -> tuple[float, dict[float, Scored]]:
    """Train at every rate with every seed; the best rate has the lowest mean validation loss."""
    grid = {lr: mean_scored([score(run(lr, seed)) for seed in seeds]) for lr in lrs}
    return min(grid, key=lambda lr: grid[lr].val), grid


def progress(message: str) -> None:
    print(f"[fl_vs_isolated] {message}", file=sys.stderr, flush=True)


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise BudgetError(f"--lrs {text!r}: not a comma-separated list of numbers") from exc
    if not lrs or any(not lr > 0 for lr in lrs):
        raise BudgetError(f"--lrs {text!r}: need one or more positive rates")
    return lrs


#: Settings that differ on a pretrained base (CPU minutes per SmolLM2 step, not milliseconds):
#: ``fedsec simulate``'s own recipe as the federated arm, fewer rounds, smaller batches and data,
#: two rates, one seed. Each applies only where the flag was not given.
PRETRAINED_DEFAULTS = {
    "rounds": 5,
    "local_steps": 4,
    "fedavg_local_steps": 4,
    "strategy": "fedavg",
    "client_optimizer": "adamw",
    "lrs": "1e-3,2e-3",
    "seeds": 1,
    "batch_size": 4,
    "records": 48,
    "eval_records": 24,
    "arms": "federated,isolated,centralized",
}
EMBEDDED_DEFAULTS = {
    "rounds": 80,
    "local_steps": 1,
    "fedavg_local_steps": defaults.LOCAL_STEPS,
    "strategy": "fedadam",
    "client_optimizer": "sgd",
    "lrs": "0.01,0.015,0.02,0.025,0.03,0.04",
    "seeds": 3,
    "batch_size": defaults.BATCH_SIZE,
    "records": defaults.RECORDS_PER_INSTITUTION,
    "eval_records": defaults.TEST_RECORDS_PER_INSTITUTION,
    "arms": "federated,federated_fedavg,isolated,centralized,centralized_sequential",
}
ARMS = ("federated", "federated_fedavg", "isolated", "centralized", "centralized_sequential")


def choose_model(requested: str | None) -> tuple[str, str]:
    """The base to run on and why: the pretrained model when its extra is installed."""
    if requested is not None:
        return requested, "asked for with --model"
    if named_model_available("smollm2-135m"):
        return "smollm2-135m", "the pretrained base (the smollm2 extra is installed)"
    return "embedded", (
        "the embedded random-init tiny Llama: the smollm2 extra is not installed (make smollm2), "
        "so this is not yet a fine-tuning result"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="embedded or smollm2-135m (default: auto)")
    parser.add_argument("--institutions", type=int, default=defaults.INSTITUTIONS)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--records", type=int, default=None, help="training records each")
    parser.add_argument("--eval-records", type=int, default=None, help="held-out records each")
    parser.add_argument("--lrs", default=None, help="the learning-rate grid")
    parser.add_argument("--strategy", default=None, choices=sorted(STRATEGIES))
    parser.add_argument("--client-optimizer", default=None, choices=("adamw", "sgd"))
    parser.add_argument(
        "--client-lr",
        type=float,
        default=1.0,
        help="client lr under an adaptive server strategy (the grid tunes the server's eta)",
    )
    parser.add_argument("--tau", type=float, default=1e-6, help="adaptive server's epsilon")
    parser.add_argument(
        "--fedavg-local-steps",
        type=int,
        default=None,
        help="local steps of the federated_fedavg arm (it runs rounds*local-steps/this rounds)",
    )
    parser.add_argument("--arms", default=None, help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--generate", type=int, default=4, help="test questions per institution")
    parser.add_argument("--seed", type=int, default=defaults.SEED, help="model and data seed")
    parser.add_argument(
        "--seeds", type=int, default=None, help="training seeds per (arm, rate); figures are means"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: a shared machine's other jobs cannot stall OpenMP barriers)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 rounds of 1 step, FedAvg 2 x 2, one rate"
    )
    args = parser.parse_args()
    model, why = choose_model(args.model)
    base_defaults = EMBEDDED_DEFAULTS if model == "embedded" else PRETRAINED_DEFAULTS
    for key, value in base_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        lrs = parse_lrs(args.lrs)
        arms_wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = sorted(set(arms_wanted) - set(ARMS))
        if unknown or "federated" not in arms_wanted or "isolated" not in arms_wanted:
            raise BudgetError(f"--arms {args.arms!r}: need federated and isolated, of {ARMS}")
        if args.quick:
            args.rounds, args.local_steps, args.fedavg_local_steps, lrs = 4, 1, 2, lrs[:1]
            args.seeds = 1
        budget = Budget(
            args.institutions,
            args.rounds,
            args.local_steps,
            args.batch_size,
            args.fedavg_local_steps,
        )
        if not (args.client_lr > 0 and args.tau > 0 and args.threads >= 1 and args.seeds >= 1):
            raise BudgetError("--client-lr and --tau must be > 0, --threads and --seeds >= 1")
    except BudgetError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    adaptive = args.strategy in ADAPTIVE
    recipe = FederatedRecipe(
        args.strategy,
        budget.rounds,
        budget.local_steps,
        args.client_optimizer,
        args.client_lr if adaptive else None,
        args.tau,
    )
    fedavg = FederatedRecipe(
        "fedavg", budget.fedavg_rounds, budget.fedavg_local_steps, "adamw", None, args.tau
    )
    kind: recipes.BaseKind = "embedded" if model == "embedded" else "pretrained"
    spec = SimulationSpec(
        budget.institutions,
        1,
        recipes.resolve(kind, {"batch_size": budget.batch_size}).recipe,
        seed=args.seed,
        model=model,
        records=args.records,
        eval_records=args.eval_records,
    )
    progress(f"base: {model} ({why})")
    _, trainer = prepare(spec)
    work = trainer.work
    start = work.lm.get_vector()
    own_val, own_test = split_own(work.test_sets)
    pooled_val = union(own_val)
    test_tokens = {n: _tokens(d) for n, d in own_test.items()}

    def scorer(val_set: TokenizedDataset) -> Callable[[np.ndarray], Scored]:
        def score(vector: np.ndarray) -> Scored:
            sets = {"val": val_set, **{f"test:{n}": d for n, d in own_test.items()}}
            losses = evaluate(work.lm, vector, sets, work.pad_id)
            own = {n: losses[f"test:{n}"] for n in own_test}
            pooled = sum(own[n] * test_tokens[n] for n in own) / sum(test_tokens.values())
            return Scored(losses["val"], pooled, (), own)

        return score

    initial = scorer(pooled_val)(start)
    progress(f"initial loss val {initial.val:.3f} test {initial.test:.3f}; lrs {lrs}")
    # Training seeds: far apart so the isolated arms' per-institution offsets never collide.
    seeds = [args.seed + 7919 * repeat for repeat in range(args.seeds)]
    fed_runs: dict[float, list[FederatedRun]] = {}
    kept: dict[tuple[str, float], np.ndarray] = {}  # first seed's model, for generation

    def federated(lr: float, seed: int) -> np.ndarray:
        run = train_federated(work, start, recipe, lr, budget.batch_size, seed, args.threads)
        fed_runs.setdefault(lr, []).append(run)
        return run.vector

    def timed(
        name: str, run: Callable[[float, int], np.ndarray]
    ) -> Callable[[float, int], np.ndarray]:
        def wrapped(lr: float, seed: int) -> np.ndarray:
            t = time.perf_counter()
            vector = run(lr, seed)
            kept.setdefault((name, lr), vector)
            progress(f"{name} lr {lr:g} seed {seed}: {time.perf_counter() - t:.1f} s")
            return vector

        return wrapped

    pooled = union(work.train_sets)
    arms: dict[str, tuple[Callable[[float, int], np.ndarray], TokenizedDataset]] = {
        "federated": (federated, pooled_val)
    }
    if "federated_fedavg" in arms_wanted:
        arms["federated_fedavg"] = (
            lambda lr, seed: (
                train_federated(
                    work, start, fedavg, lr, budget.batch_size, seed, args.threads
                ).vector
            ),
            pooled_val,
        )
    if "centralized" in arms_wanted:
        arms["centralized"] = (
            lambda lr, seed: train_alone(
                work, start, pooled, budget.centralized, lr, seed, args.threads
            ),
            pooled_val,
        )
    if "centralized_sequential" in arms_wanted:
        arms["centralized_sequential"] = (
            lambda lr, seed: train_alone(
                work, start, pooled, budget.centralized_sequential, lr, seed, args.threads
            ),
            pooled_val,
        )

    def alone(data: TokenizedDataset, offset: int) -> Callable[[float, int], np.ndarray]:
        """Institution ``offset`` on its own data, with its own seeds."""
        return lambda lr, seed: train_alone(
            work, start, data, budget.isolated, lr, seed + offset, args.threads
        )

    for index, (name, data) in enumerate(sorted(work.train_sets.items())):
        # Alone, an institution can only choose its rate on its own validation data.
        arms[f"isolated:{name}"] = (alone(data, index), own_val[name])
    best: dict[str, float] = {}
    grids: dict[str, dict[float, Scored]] = {}
    for name, (run, val_set) in arms.items():
        best[name], grids[name] = tune(lrs, seeds, timed(name, run), scorer(val_set))
        top = grids[name][best[name]]
        progress(f"{name}: lr {best[name]:g} val {top.val:.3f} test {top.test:.3f}")

    def chosen(name: str) -> Scored:
        return grids[name][best[name]]

    def answers(name: str, institution: str) -> dict[str, float]:
        examples = list(own_test[institution].examples[: args.generate])
        vector = kept[(name, best[name])]
        score = answer_questions(work.lm, vector, examples, work.tokenizer)
        return {"exact_match": score.exact_match, "rouge_l": score.rouge_l}

    shared = [a for a in ("federated", "federated_fedavg", "centralized") if a in arms]
    per_institution: dict[str, dict[str, object]] = {}
    for name in sorted(work.train_sets):
        alone_loss = chosen(f"isolated:{name}").own[name]
        row: dict[str, object] = {"isolated": alone_loss}
        row.update({a: chosen(a).own[name] for a in shared})
        row["initial"] = initial.own[name]
        row["federation_beats_alone"] = chosen("federated").own[name] < alone_loss
        if "centralized" in arms:
            row["federated_vs_centralized"] = (
                chosen("federated").own[name] / chosen("centralized").own[name]
            )
        if args.generate > 0:
            row["generation"] = {
                arm: answers(arm if arm != "isolated" else f"isolated:{name}", name)
                for arm in (
                    "federated",
                    "isolated",
                    *(["centralized"] if "centralized" in arms else []),
                )
            }
        per_institution[name] = row
    beats = [n for n, r in per_institution.items() if r["federation_beats_alone"]]
    outcomes = [o for run in fed_runs[best["federated"]] for o in run.outcomes]
    train_s = sum(o.metrics.train_s for o in outcomes)
    agg_s = sum(o.metrics.aggregation_s for o in outcomes)
    fed = chosen("federated").test
    print(
        json.dumps(
            {
                "benchmark": "fl_vs_isolated",
                "model": model,
                "model_note": why,
                "institutions": budget.institutions,
                "batch_size": budget.batch_size,
                "steps_per_institution": budget.steps_per_institution,
                "federation_examples": budget.federation_examples,
                "federated_recipe": {
                    "strategy": recipe.strategy,
                    "rounds": recipe.rounds,
                    "local_steps": recipe.local_steps,
                    "client_optimizer": recipe.optimizer,
                    "client_lr": recipe.client_lr if adaptive else "tuned",
                    "server_lr": "tuned" if adaptive else None,
                    "tau": recipe.tau if adaptive else None,
                },
                "arms": [*sorted(a for a in arms if not a.startswith("isolated:")), "isolated"],
                "evaluation": "each institution's own held-out set, halved: rates chosen on "
                "validation (isolated arms on their own institution's half), losses on the test "
                "halves",
                "lrs": lrs,
                "seeds": seeds,
                "threads": args.threads,
                "best_lr": best,
                "initial": initial.test,
                "per_institution": per_institution,
                "federation_beats_alone_in": f"{len(beats)} of {len(per_institution)}",
                "federation_does_not_beat_alone": sorted(set(per_institution) - set(beats)),
                "pooled_test": {a: chosen(a).test for a in arms if not a.startswith("isolated")},
                "federated_vs_centralized": fed / chosen("centralized").test
                if "centralized" in arms
                else None,
                "secagg_overhead_fraction": agg_s / (train_s + agg_s),
                "secagg_s_per_round": agg_s / len(outcomes),
                "train_s_per_round": train_s / len(outcomes),
                "upload_bytes_per_client": outcomes[-1].metrics.upload_bytes["per_client_mean"],
                "secure_vs_plain_max_abs_diff": max(
                    o.metrics.secure_vs_plain_max_abs_diff for o in outcomes
                ),
                "grid": {
                    name: {
                        f"{lr:g}": {"val": s.val, "test": s.test, "runs": s.runs, "own": s.own}
                        for lr, s in g.items()
                    }
                    for name, g in grids.items()
                },
                "wall_s": time.perf_counter() - began,
            }
        )
    )


def _tokens(data: TokenizedDataset) -> int:
    return sum(int((labels[1:] != -100).sum()) for labels in data.labels)


if __name__ == "__main__":
    main()

"""Federated (secure aggregation) vs each institution alone vs pooled training: one JSON line.

On the embedded non-IID task (:mod:`clients.synthetic`), N institutions, from the same base model
and the same initial adapter, every arm with **the same compute per institution** (R*K
optimiser steps of B examples each, B = the simulate batch size):

* ``federated`` (the arm the targets are judged on): R rounds of K local steps per institution
  under secure aggregation. Default: FedAdam (Reddi et al., ICLR'21) over R=80 rounds of K=1
  plain-SGD step (client lr 1.0, so the update is the clipped gradient; server tau 1e-6, so the
  server's Adam sees it unscaled): the server's Adam state persists across rounds, whereas the
  clients' AdamW in FedAvg restarts every round (compare the ``federated_fedavg`` arm below).
* ``federated_fedavg``: ``fedsec simulate``'s own recipe (FedAvg, AdamW clients,
  ``--fedavg-local-steps`` local steps, R*K/that rounds), reported so nothing is hidden.
* ``isolated``: each institution alone, R*K steps of batch B.
* ``centralized`` (the baseline the 5% target is judged on): the pooled data of all
  institutions, R*K steps of batch N*B: the same examples per step as one federated round-step
  processes across the institutions, the same number of sequential steps, the same total
  examples. AdamW, like every AdamW arm here.
* ``centralized_sequential``: the pooled data, N*R*K steps of batch B (as many sequential steps
  as the whole federation has client steps); N times the sequential depth, so not the
  same-compute baseline, but reported.

Learning rate: every arm is trained at each rate of ``--lrs`` (the Adam step size: AdamW's lr
for the AdamW arms, the server's eta for an adaptive server strategy, the client lr for
FedAvg-family strategies); the union of the domains' held-out test sets is split per domain into
a validation half, on which each arm's rate is chosen, and a test half, on which the reported
losses are measured (mean per-token loss on the response tokens). Every figure is the mean over
``--seeds`` training seeds (data order, LoRA dropout and, for the federated arms, the secure
randomness of stochastic rounding and masks; the model, the data and the split stay fixed): near
its best rate the federated arm trains at the edge of stability, and one run's validation loss
can differ from another's by 0.1, enough to pick the wrong rate. Every (arm, rate) mean and its
per-seed runs are in the JSON under ``grid``.

Targets: federated better than every isolated model, within 5% of centralized, and secure
aggregation at most 10% of a round (``secagg_overhead_fraction``: encoding, the full protocol for
every client and the server, and decoding, over training plus aggregation time of the round's
clients; the simulation runs the clients one after another, so both are sums over clients; the
benchmark's own evaluation is not part of a round).

    .venv/bin/python benchmarks/fl_vs_isolated.py [--lrs 0.01,0.015,0.02,0.025,0.03,0.04]
        [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from clients import defaults
from clients.data import TokenizedDataset
from clients.simulate_cli import SimulationSpec, TorchTrainer, Workload, default_clip, prepare
from clients.trainer import TrainSettings, evaluate, train_local
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


def split_eval(sets: Mapping[str, TokenizedDataset]) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(validation, test): the first and second half of every domain's held-out set, unioned.

    Per domain, so both halves weigh the domains alike; the synthetic test records of a domain
    are i.i.d. draws, so the halves are two samples of the same distribution.
    """
    val: dict[str, TokenizedDataset] = {}
    test: dict[str, TokenizedDataset] = {}
    for name, data in sets.items():
        if len(data) < 2:
            raise BudgetError(f"eval set {name} has {len(data)} record(s); need 2 to split")
        half = len(data) // 2
        val[name] = TokenizedDataset(data.input_ids[:half], data.labels[:half], 0)
        test[name] = TokenizedDataset(data.input_ids[half:], data.labels[half:], 0)
    return union(val), union(test)


@dataclass(frozen=True)
class Scored:
    """Validation and test loss; a mean over seeds keeps the per-seed (val, test) in ``runs``."""

    val: float
    test: float
    runs: tuple[tuple[float, float], ...] = ()


def mean_scored(scores: Sequence[Scored]) -> Scored:
    if not scores:
        raise BudgetError("no runs to average")
    return Scored(
        float(np.mean([s.val for s in scores])),
        float(np.mean([s.test for s in scores])),
        tuple((s.val, s.test) for s in scores),
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
    """One federation under secure aggregation (``clients.simulate_cli``'s trainer and config)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=defaults.INSTITUTIONS)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument(
        "--lrs", default="0.01,0.015,0.02,0.025,0.03,0.04", help="the learning-rate grid"
    )
    parser.add_argument("--strategy", default="fedadam", choices=sorted(STRATEGIES))
    parser.add_argument("--client-optimizer", default="sgd", choices=("adamw", "sgd"))
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
        default=defaults.LOCAL_STEPS,
        help="local steps of the federated_fedavg arm (it runs rounds*local-steps/this rounds)",
    )
    parser.add_argument("--seed", type=int, default=defaults.SEED, help="model and data seed")
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds per (arm, rate); figures are means"
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
    try:
        lrs = parse_lrs(args.lrs)
        if args.quick:
            args.rounds, args.local_steps, args.fedavg_local_steps, lrs = 4, 1, 2, lrs[:1]
            args.seeds = 1
        budget = Budget(
            args.institutions,
            args.rounds,
            args.local_steps,
            defaults.BATCH_SIZE,
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
    _, trainer = prepare(SimulationSpec(budget.institutions, 1, 1, seed=args.seed))
    work = trainer.work
    start = work.lm.get_vector()
    val_set, test_set = split_eval(work.test_sets)

    def score(vector: np.ndarray) -> Scored:
        losses = evaluate(work.lm, vector, {"val": val_set, "test": test_set}, work.pad_id)
        return Scored(losses["val"], losses["test"])

    initial = score(start)
    progress(f"initial loss val {initial.val:.3f} test {initial.test:.3f}; lrs {lrs}")
    # Training seeds: far apart so the isolated arms' per-institution offsets never collide.
    seeds = [args.seed + 7919 * repeat for repeat in range(args.seeds)]
    fed_runs: dict[float, list[FederatedRun]] = {}

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
            progress(f"{name} lr {lr:g} seed {seed}: {time.perf_counter() - t:.1f} s")
            return vector

        return wrapped

    pooled = union(work.train_sets)
    arms: dict[str, Callable[[float, int], np.ndarray]] = {
        "federated": federated,
        "federated_fedavg": lambda lr, seed: (
            train_federated(work, start, fedavg, lr, budget.batch_size, seed, args.threads).vector
        ),
        "centralized": lambda lr, seed: train_alone(
            work, start, pooled, budget.centralized, lr, seed, args.threads
        ),
        "centralized_sequential": lambda lr, seed: train_alone(
            work, start, pooled, budget.centralized_sequential, lr, seed, args.threads
        ),
    }

    def alone(data: TokenizedDataset, offset: int) -> Callable[[float, int], np.ndarray]:
        """Institution ``offset`` on its own data, with its own seeds."""
        return lambda lr, seed: train_alone(
            work, start, data, budget.isolated, lr, seed + offset, args.threads
        )

    for index, (name, data) in enumerate(sorted(work.train_sets.items())):
        arms[f"isolated:{name}"] = alone(data, index)
    best: dict[str, float] = {}
    grids: dict[str, dict[float, Scored]] = {}
    for name, run in arms.items():
        best[name], grids[name] = tune(lrs, seeds, timed(name, run), score)
        chosen = grids[name][best[name]]
        progress(f"{name}: lr {best[name]:g} val {chosen.val:.3f} test {chosen.test:.3f}")

    def test(name: str) -> float:
        return grids[name][best[name]].test

    isolated = {n.split(":", 1)[1]: test(n) for n in arms if n.startswith("isolated:")}
    fed, central = test("federated"), test("centralized")
    outcomes = [o for run in fed_runs[best["federated"]] for o in run.outcomes]
    train_s = sum(o.metrics.train_s for o in outcomes)
    agg_s = sum(o.metrics.aggregation_s for o in outcomes)
    print(
        json.dumps(
            {
                "benchmark": "fl_vs_isolated",
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
                "federated_fedavg_recipe": {
                    "rounds": fedavg.rounds,
                    "local_steps": fedavg.local_steps,
                    "client_optimizer": "adamw",
                },
                "centralized_arm": {
                    "steps": budget.centralized.steps,
                    "batch_size": budget.centralized.batch_size,
                    "examples": budget.centralized.examples,
                },
                "centralized_sequential_arm": {
                    "steps": budget.centralized_sequential.steps,
                    "batch_size": budget.centralized_sequential.batch_size,
                    "examples": budget.centralized_sequential.examples,
                },
                "target_judged_on": "federated vs centralized (pooled, batch N*B, R*K steps)",
                "lr_selection": "per arm, lowest loss on the validation half of the eval sets",
                "lrs": lrs,
                "seeds": seeds,
                "threads": args.threads,
                "best_lr": best,
                "initial": initial.test,
                "federated": fed,
                "federated_fedavg": test("federated_fedavg"),
                "isolated": isolated,
                "isolated_best": min(isolated.values()),
                "isolated_worst": max(isolated.values()),
                "centralized": central,
                "centralized_sequential": test("centralized_sequential"),
                "federated_beats_every_isolated": fed < min(isolated.values()),
                "federated_vs_centralized": fed / central,
                "within_5pct_of_centralized": fed <= 1.05 * central,
                "federated_fedavg_vs_centralized": test("federated_fedavg") / central,
                "federated_vs_centralized_sequential": fed / test("centralized_sequential"),
                "secagg_overhead_fraction": agg_s / (train_s + agg_s),
                "secagg_s_per_round": agg_s / len(outcomes),
                "train_s_per_round": train_s / len(outcomes),
                "upload_bytes_per_client": outcomes[-1].metrics.upload_bytes["per_client_mean"],
                "secure_vs_plain_max_abs_diff": max(
                    o.metrics.secure_vs_plain_max_abs_diff for o in outcomes
                ),
                "grid": {
                    name: {
                        f"{lr:g}": {"val": s.val, "test": s.test, "runs": s.runs}
                        for lr, s in g.items()
                    }
                    for name, g in grids.items()
                },
                "wall_s": time.perf_counter() - began,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Federated (secure aggregation) vs each institution alone vs pooled training: one JSON line.

On the embedded non-IID task (:mod:`clients.synthetic`), from the same base model and the same
initial adapter:

* ``federated``: ``fedsec simulate``'s federation (FedAvg under SecAgg), R rounds of K local
  steps per institution;
* ``isolated``: each institution trains alone for R*K steps (the same compute per institution);
* ``centralized``: one model on the pooled data of all institutions for N*R*K steps (the same
  total compute as the whole federation).

Each is scored by the mean per-token eval loss on the union of all domains' held-out test sets.
Targets: federated better than every isolated model, within 5% of centralized, and secure
aggregation at most 10% of a round's time (``secagg_overhead_fraction``: time spent encoding,
running the full protocol for every client and the server, and decoding, over the round's wall
time; both are sums over clients because the simulation runs them one after another).

    .venv/bin/python benchmarks/fl_vs_isolated.py [--rounds R] [--local-steps K] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from clients import defaults
from clients.data import TokenizedDataset
from clients.simulate_cli import SimulationSpec, TorchTrainer, prepare
from clients.trainer import TrainSettings, evaluate, train_local
from fl_core.strategies import STRATEGIES


def union(sets: dict[str, TokenizedDataset]) -> TokenizedDataset:
    ids = tuple(x for s in sets.values() for x in s.input_ids)
    labels = tuple(x for s in sets.values() for x in s.labels)
    return TokenizedDataset(ids, labels, sum(s.truncated for s in sets.values()))


def alone(
    trainer: TorchTrainer, start: np.ndarray, data: TokenizedDataset, steps: int, seed: int
) -> np.ndarray:
    base = trainer.settings
    settings = TrainSettings(
        local_steps=steps,
        batch_size=base.batch_size,
        lr=base.lr,
        seed=seed,
        max_grad_norm=base.max_grad_norm,
        num_threads=base.num_threads,
    )
    result = train_local(trainer.work.lm, start, data, settings, trainer.work.pad_id)
    trained: np.ndarray = (start + result.delta).astype(np.float32)
    return trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=defaults.INSTITUTIONS)
    parser.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--local-steps", type=int, default=defaults.LOCAL_STEPS)
    parser.add_argument("--lr", type=float, default=defaults.LR)
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    parser.add_argument("--strategy", default=defaults.STRATEGY, choices=sorted(STRATEGIES))
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (a smoke run)")
    args = parser.parse_args()
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.local_steps)
    spec = SimulationSpec(
        args.institutions, rounds, steps, strategy=args.strategy, lr=args.lr, seed=args.seed
    )
    fed, trainer = prepare(spec)
    work = trainer.work
    test = {"union": union(work.test_sets)}
    start = fed.global_vector.copy()

    def score(vector: np.ndarray) -> float:
        return evaluate(work.lm, vector, test, work.pad_id)["union"]

    began = time.perf_counter()
    initial = score(start)
    fed.evaluator = lambda v: {"union": score(v)}
    outcomes = fed.run()
    federated = outcomes[-1].metrics.eval_loss["union"]
    agg_s = sum(o.metrics.aggregation_s for o in outcomes)
    round_s = sum(o.metrics.round_s for o in outcomes)
    fed_s = time.perf_counter() - began

    isolated = {}
    for index, (name, data) in enumerate(sorted(work.train_sets.items())):
        isolated[name] = score(alone(trainer, start, data, rounds * steps, args.seed + index))
    pooled = union(work.train_sets)
    total_steps = len(work.train_sets) * rounds * steps
    centralized = score(alone(trainer, start, pooled, total_steps, args.seed))

    best = min(isolated.values())
    print(
        json.dumps(
            {
                "benchmark": "fl_vs_isolated",
                "institutions": len(work.train_sets),
                "rounds": rounds,
                "local_steps": steps,
                "batch_size": trainer.settings.batch_size,
                "lr": args.lr,
                "strategy": fed.strategy.name,
                "initial": initial,
                "federated": federated,
                "isolated": isolated,
                "isolated_best": best,
                "isolated_worst": max(isolated.values()),
                "centralized": centralized,
                "centralized_steps": total_steps,
                "federated_beats_every_isolated": federated < best,
                "federated_vs_centralized": federated / centralized,
                "within_5pct_of_centralized": federated <= 1.05 * centralized,
                "secagg_overhead_fraction": agg_s / round_s,
                "secagg_s_per_round": agg_s / rounds,
                "round_s": round_s / rounds,
                "upload_bytes_per_client": outcomes[-1].metrics.upload_bytes["per_client_mean"],
                "secure_vs_plain_max_abs_diff": max(
                    o.metrics.secure_vs_plain_max_abs_diff for o in outcomes
                ),
                "federated_wall_s": fed_s,
                "wall_s": time.perf_counter() - began,
            }
        )
    )


if __name__ == "__main__":
    main()

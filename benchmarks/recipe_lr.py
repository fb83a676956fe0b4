"""Client learning rate for a base model: the federated run at each rate, one JSON line.

The measurement behind :data:`fl_core.recipe.PRETRAINED`'s lr: ``fedsec simulate``'s workload
(the embedded institutions, each scored on its own held-out set, the pooled loss over their
union) on ``--model`` (default ``smollm2-135m``, which needs ``make smollm2``), the same initial
adapter and seed at every rate, FedAvg under secure aggregation. Reports the pooled held-out loss
after every round and the generation scores (exact match, ROUGE-L) at the end, per rate.

    .venv/bin/python benchmarks/recipe_lr.py [--model smollm2-135m] [--lrs 5e-4,1e-3,2e-3,4e-3]
        [--rounds 4] [--local-steps 10] [--batch-size 4] [--records 48] [--eval-records 12]
        [--strategy scaffold] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from clients.generation import answer_questions
from clients.simulation import TorchTrainer, default_clip
from clients.trainer import TrainSettings
from clients.workload import SimulationSpec, build_workload
from fl_core import recipe as recipes
from fl_core.federation import Federation, FederationConfig, SecAggSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3")
    parser.add_argument(
        "--strategy", default="fedavg", help="its measured defaults apply (SCAFFOLD: SGD)"
    )
    parser.add_argument("--institutions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--eval-records", type=int, default=12)
    parser.add_argument("--generate", type=int, default=3, help="questions per institution")
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine two OpenMP threads per step stall, "
        "measured 2.5 s/step with 1 thread, 30-50 s with 2)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    lrs = [float(x) for x in args.lrs.split(",")]
    overrides: dict[str, Any] = {
        "strategy": args.strategy,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
    }
    kind: recipes.BaseKind = "embedded" if args.model == "embedded" else "pretrained"
    recipe = recipes.resolve(kind, overrides).recipe
    spec = SimulationSpec(
        args.institutions,
        args.rounds,
        recipe,
        seed=args.seed,
        model=args.model,
        records=args.records,
        eval_records=args.eval_records,
    )
    work = build_workload(spec)
    start = work.lm.get_vector().copy()
    questions = {n: list(d.examples[: args.generate]) for n, d in work.test_sets.items()}

    def generation(vector: np.ndarray) -> dict[str, float]:
        scores = [answer_questions(work.lm, vector, q, work.tokenizer) for q in questions.values()]
        return {
            "exact_match": float(np.mean([s.exact_match for s in scores])),
            "rouge_l": float(np.mean([s.rouge_l for s in scores])),
        }

    initial_losses = TorchTrainer(work, TrainSettings(), args.seed).evaluate(start)
    initial = {"pooled": work.pooled(initial_losses), **generation(start)}
    print(f"[recipe_lr] initial {initial}", file=sys.stderr, flush=True)
    runs: dict[str, dict[str, Any]] = {}
    for lr in lrs:
        at_lr = recipes.resolve(kind, {**overrides, "lr": lr}).recipe
        settings = TrainSettings.from_recipe(at_lr, lr=lr, seed=args.seed)
        trainer = TorchTrainer(work, settings, args.seed)
        config = FederationConfig(
            clients=tuple(sorted(work.train_sets)),
            rounds=args.rounds,
            secagg=SecAggSettings(clip=default_clip(settings, args.strategy)),
            strategy=args.strategy,
            strategy_hparams=at_lr.params(),
            seed=args.seed,
        )
        max_samples = max(len(d) for d in work.train_sets.values())
        fed = Federation(config, trainer, trainer.evaluate, start.copy(), max_samples)
        t = time.perf_counter()
        pooled = [work.pooled(o.metrics.eval_loss) for o in fed.run()]
        runs[f"{lr:g}"] = {
            "pooled_by_round": pooled,
            **generation(fed.global_vector),
            "wall_s": time.perf_counter() - t,
        }
        print(f"[recipe_lr] lr {lr:g}: {runs[f'{lr:g}']}", file=sys.stderr, flush=True)
    best = min(runs, key=lambda k: runs[k]["pooled_by_round"][-1])
    print(
        json.dumps(
            {
                "benchmark": "recipe_lr",
                "model": args.model,
                "strategy": args.strategy,
                "optimizer": recipe.optimizer,
                "institutions": args.institutions,
                "rounds": args.rounds,
                "local_steps": args.local_steps,
                "batch_size": args.batch_size,
                "records": args.records,
                "eval_records": args.eval_records,
                "initial": initial,
                "runs": runs,
                "best_lr": float(best),
                "wall_s": time.perf_counter() - began,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Does every strategy learn at its defaults? One JSON line per run of the embedded federation.

For each strategy, ``fedsec simulate``'s own workload and recipe (the embedded defaults,
:func:`fl_core.recipe.resolve`, so SCAFFOLD gets its SGD clients and every strategy its default
hyper-parameters) over the default rounds, scored every round on the pooled held-out set (the
union of the institutions' own sets). A strategy *learns* when its final pooled loss is at least
``--margin`` below the initial one and no round ends more than ``--margin`` above the best round
before it (no divergence). ``--param STRATEGY:KEY=VALUE`` and ``--lr`` override defaults, to
measure the alternatives the defaults were chosen from.

    .venv/bin/python benchmarks/strategies.py [--strategies fedavg,fedadam] [--rounds 8]
        [--param fedadam:eta=0.003] [--lr 0.01] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from clients import defaults
from clients.simulation import prepare
from clients.workload import SimulationSpec
from fl_core import recipe as recipes
from fl_core.strategies import STRATEGIES


def measure(strategy: str, overrides: dict[str, Any], rounds: int, seed: int) -> dict[str, Any]:
    resolved = recipes.resolve("embedded", {"strategy": strategy, **overrides})
    spec = SimulationSpec(rounds=rounds, recipe=resolved.recipe, seed=seed, generate=0)
    fed, trainer = prepare(spec)
    work = trainer.work
    began = time.perf_counter()
    initial = work.pooled(trainer.evaluate(fed.global_vector))
    pooled = [work.pooled(o.metrics.eval_loss) for o in fed.run()]
    best_before = [min([initial, *pooled[:i]]) for i in range(len(pooled))]
    worst_rise = max(p - b for p, b in zip(pooled, best_before, strict=True))
    return {
        "strategy": strategy,
        "lr": resolved.recipe.lr,
        "optimizer": resolved.recipe.optimizer,
        "strategy_params": resolved.recipe.params(),
        "notes": list(resolved.notes),
        "initial": round(initial, 4),
        "pooled_by_round": [round(p, 4) for p in pooled],
        "final": round(pooled[-1], 4),
        "best": round(min(pooled), 4),
        "worst_rise_over_best_so_far": round(worst_rise, 4),
        "wall_s": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    parser.add_argument("--lr", type=float, default=None, help="client lr for every strategy")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--param", action="append", default=[], metavar="STRATEGY:KEY=VALUE")
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params: dict[str, dict[str, float]] = {}
    for item in args.param:
        name, _, assignment = item.partition(":")
        key, value = recipes.parse_strategy_param(assignment)
        params.setdefault(name, {})[key] = value
    results = []
    for strategy in args.strategies.split(","):
        overrides: dict[str, Any] = {"threads": args.threads}
        if args.lr is not None:
            overrides["lr"] = args.lr
        if args.optimizer is not None:
            overrides["optimizer"] = args.optimizer
        if args.local_steps is not None:
            overrides["local_steps"] = args.local_steps
        if strategy in params:
            overrides["strategy_params"] = tuple(sorted(params[strategy].items()))
        result = measure(strategy, overrides, args.rounds, args.seed)
        result["learns"] = (
            result["final"] <= result["initial"] - args.margin
            and result["worst_rise_over_best_so_far"] <= args.margin
        )
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    print(
        json.dumps(
            {
                "benchmark": "strategies",
                "rounds": args.rounds,
                "seed": args.seed,
                "margin": args.margin,
                "all_learn": all(r["learns"] for r in results),
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()

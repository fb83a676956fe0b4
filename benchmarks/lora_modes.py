"""Plain LoRA versus FFA-LoRA under plaintext FedAvg on the embedded task; prints one JSON line.

Both modes run the same federation (institutions, seeds, rounds, local steps, batch size) for
each learning rate in ``--lrs``. Reported per mode and learning rate: mean eval loss on the union
of all domains' held-out test sets after the last round. For plain mode also the aggregation
error of averaging A and B separately, ``||mean(B) mean(A) - mean(BA)|| / ||mean(BA)||`` over
all adapted modules (Frobenius norms, summed over modules), averaged over rounds: the part of the
clients' mean update that plain FedAvg of LoRA factors does not deliver. FFA-LoRA's is 0 by
construction (A is shared and frozen).

    .venv/bin/python benchmarks/lora_modes.py [--rounds 8] [--lrs 0.01,0.03]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from clients import defaults
from clients.data import TokenizedDataset, alpaca_example, tokenize
from clients.model_factory import build_default_base
from clients.synthetic import make_federation
from clients.trainer import LoraMode, LoraModel, LoraSettings, TrainSettings, evaluate, train_local


def _aggregation_error(lm: LoraModel, client_tensors: list[dict[str, np.ndarray]]) -> float:
    num, den = 0.0, 0.0
    for a_name in (n for n in lm.full_layout.names if ".lora_A." in n):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        a = np.stack([t[a_name].astype(np.float64) for t in client_tensors])
        b = np.stack([t[b_name].astype(np.float64) for t in client_tensors])
        exact = np.mean(b @ a, axis=0)
        num += float(np.sum((b.mean(0) @ a.mean(0) - exact) ** 2))
        den += float(np.sum(exact**2))
    return (num / den) ** 0.5 if den > 0 else 0.0


def run(mode: LoraMode, lr: float, rounds: int) -> dict[str, float]:
    d = defaults.DEFAULTS
    recipe = d.recipe
    fed = make_federation(
        d.institutions,
        d.records_per_institution,
        d.test_records_per_domain,
        d.own_domain_share,
        d.seed,
    )
    base, tok = build_default_base(fed.corpus(), d.model)
    lm = LoraModel(base, LoraSettings(rank=recipe.lora_rank, alpha=recipe.lora_alpha, mode=mode))
    pad = int(tok.pad_token_id)
    trains = [
        tokenize([alpaca_example(r) for r in i.records], tok, recipe.max_length, i.name)
        for i in fed.institutions
    ]
    union_records = [r for recs in fed.test_sets.values() for r in recs]
    union: dict[str, TokenizedDataset] = {
        "union": tokenize(
            [alpaca_example(r) for r in union_records], tok, recipe.max_length, "union"
        )
    }
    g = lm.get_vector()
    errors = []
    start = time.perf_counter()
    for r in range(rounds):
        deltas, weights, trained = [], [], []
        for i, data in enumerate(trains):
            settings = TrainSettings(
                local_steps=defaults.LOCAL_STEPS,
                batch_size=d.recipe.batch_size,
                lr=lr,
                seed=1000 * r + i,
            )
            res = train_local(lm, g, data, settings, pad)
            deltas.append(res.delta.astype(np.float64))
            weights.append(float(res.num_samples))
            trained.append(lm.tensors())
        w = np.asarray(weights) / sum(weights)
        g = (g + np.tensordot(w, np.stack(deltas), axes=1)).astype(np.float32)
        if mode == "plain":
            errors.append(_aggregation_error(lm, trained))
    seconds = time.perf_counter() - start
    loss = evaluate(lm, g, union, pad)["union"]
    out = {"eval_loss_union": round(loss, 4), "train_seconds": round(seconds, 1)}
    if mode == "plain":
        out["aggregation_error"] = round(float(np.mean(errors)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--lrs", default="0.01,0.03", help="comma-separated learning rates")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    lrs = [float(x) for x in args.lrs.split(",")]
    results = {
        f"{mode}@{lr:g}": run(mode, lr, args.rounds) for mode in ("plain", "ffa") for lr in lrs
    }
    best = {
        mode: min((v["eval_loss_union"], k) for k, v in results.items() if k.startswith(mode))
        for mode in ("plain", "ffa")
    }
    print(
        json.dumps(
            {
                "benchmark": "lora_modes",
                "institutions": defaults.INSTITUTIONS,
                "rounds": args.rounds,
                "local_steps": defaults.LOCAL_STEPS,
                "results": results,
                "best": {
                    mode: {"config": k, "eval_loss_union": v} for mode, (v, k) in best.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()

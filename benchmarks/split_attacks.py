"""The privacy-utility table of split learning: token recall from the activations the server
receives, per cut depth and defence, with chance beside it and the eval loss split training
reaches with that cut and defence; prints the markdown table, then one JSON line.

For every cut depth k (blocks the institution runs before sending; the server holds the rest,
``client_top = 0``) and every activation-noise ratio (the defence: Gaussian noise whose standard
deviation is that multiple of each position's activation RMS, drawn by the institution from the
OS CSPRNG), the embedded task is trained with split learning in one process
(:func:`clients.split.trainer.split_federation`: 4 institutions, masking secure aggregation of the
client parts) for ``--rounds`` rounds. Then institution 0's next step is observed as the server
receives it (its first step of the next round, computed from the released global client part,
:func:`proofs.attacks.split_activations.split_activation_view`) and every attack of the
``split_activations`` view is run on it: nearest-embedding inversion (k = 0), greedy vocabulary
search and the soft-token optimisation attack (k >= 1). Chance is the better of a uniform
guesser and an informed one (the most frequent tokens of the public held-out sets) at the same
number of guesses. The model is the embedded tiny Llama with ``--layers`` blocks (4 by default,
so depths 0-3 exist); LoRA FedAvg on the same model is trained once for reference.

    .venv/bin/python benchmarks/split_attacks.py            # depths 0-3, noise 0/1/2/4 (~40 min)
    .venv/bin/python benchmarks/split_attacks.py --quick    # depths 0-1, noise 0/2, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from clients import defaults
from clients.data import TokenizedDataset, alpaca_example, tokenize
from clients.model_factory import TinyLlamaSpec, build_default_base
from clients.split.trainer import SplitOptions, split_federation
from clients.synthetic import make_federation
from clients.trainer import LoraModel, LoraSettings, TrainSettings, evaluate, train_local
from fl_core.federation import FederationConfig, SecAggSettings
from fl_core.split import SplitSpec
from proofs.attacks.split_activations import (
    ActivationScore,
    run_attack,
    score,
    split_activation_view,
)


@dataclass(frozen=True)
class Workload:
    spec: TinyLlamaSpec
    lora: LoraSettings
    base: torch.nn.Module
    pad_id: int
    train_sets: dict[str, TokenizedDataset]
    test_sets: dict[str, TokenizedDataset]
    prior: Counter[int]
    vocab: int

    def lm(self) -> LoraModel:
        import copy

        return LoraModel(copy.deepcopy(self.base), self.lora)  # type: ignore[arg-type]


def workload(layers: int, seed: int) -> Workload:
    d = defaults.DEFAULTS
    fed = make_federation(
        d.institutions,
        d.records_per_institution,
        d.test_records_per_domain,
        d.own_domain_share,
        seed,
    )
    spec = TinyLlamaSpec(**{**asdict(d.model), "num_layers": layers})
    base, tok = build_default_base(fed.corpus(), spec)
    train = {
        i.name: tokenize([alpaca_example(r) for r in i.records], tok, d.recipe.max_length, i.name)
        for i in fed.institutions
    }
    test = {
        name: tokenize([alpaca_example(r) for r in records], tok, d.recipe.max_length, name)
        for name, records in fed.test_sets.items()
    }
    prior: Counter[int] = Counter()
    for data in test.values():
        for ids in data.input_ids:
            prior.update(int(t) for t in ids)
    lora = LoraSettings.from_recipe(d.recipe, init_seed=seed)
    return Workload(spec, lora, base, int(tok.pad_token_id), train, test, prior, len(tok))


THREADS = 1


def settings(steps: int, seed: int) -> TrainSettings:
    return TrainSettings(
        local_steps=steps,
        batch_size=defaults.BATCH_SIZE,
        lr=defaults.LR,
        seed=seed,
        num_threads=THREADS,
    )


def fedavg_loss(work: Workload, rounds: int, steps: int, seed: int) -> float:
    """Plaintext LoRA FedAvg on the same model: the utility reference."""
    lm = work.lm()
    g = lm.get_vector()
    names = sorted(work.train_sets)
    offsets = dict.fromkeys(names, 0)
    for _ in range(rounds):
        deltas, weights = [], []
        for i, name in enumerate(names):
            s = settings(steps, seed * 1_000_003 + i)
            s = TrainSettings(**{**s.__dict__, "data_offset": offsets[name]})
            result = train_local(lm, g, work.train_sets[name], s, work.pad_id)
            offsets[name] += result.steps
            deltas.append(result.delta.astype(np.float64) * result.num_samples)
            weights.append(result.num_samples)
        g = (g + np.sum(deltas, axis=0) / sum(weights)).astype(np.float32)
    return float(np.mean(list(evaluate(lm, g, work.test_sets, work.pad_id).values())))


def victim_batch(work: Workload, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = work.train_sets[sorted(work.train_sets)[0]]
    texts = [ids for ids in data.input_ids if len(ids) >= length][:rows]
    ids = torch.tensor(np.stack([t[:length] for t in texts]), dtype=torch.long)
    return ids, torch.ones_like(ids)


def run_setting(
    work: Workload, depth: int, noise: float, args: argparse.Namespace
) -> tuple[float | None, dict[str, ActivationScore], float]:
    lm = work.lm()
    started = time.perf_counter()
    loss: float | None = None
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=max(args.rounds, 1),
        secagg=SecAggSettings(clip=2.0 * defaults.LR * args.local_steps),
        seed=args.seed,
    )
    fed, trainer = split_federation(
        lm,
        work.pad_id,
        work.train_sets,
        work.test_sets,
        config,
        settings(args.local_steps, args.seed),
        SplitOptions(SplitSpec(depth, 0), noise),
        defaults.MAX_LENGTH,
    )
    if args.rounds > 0:
        fed.run()
        loss = float(np.mean(list(trainer.evaluate(fed.global_vector).values())))
    trainer.client.set_client_vector(fed.global_vector)
    ids, mask = victim_batch(work, args.rows, args.length)
    view = split_activation_view(trainer.client, ids, mask, noise)
    scores: dict[str, ActivationScore] = {}
    attacks = (["nearest_embedding"] if depth == 0 else []) + ["greedy", "optimisation"]
    for attack in attacks:
        result = run_attack(
            attack, view, trainer.client, args.length, args.optimisation_steps, args.seed
        )
        scores[attack] = score(result, ids, view, args.length, work.vocab, work.prior)
    return loss, scores, time.perf_counter() - started


def markdown(rows: list[dict[str, object]], reference: float | None) -> str:
    lines = [
        "| cut depth k | noise ratio | attack | token recall | chance recall | positions exact "
        "| eval loss (split) |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        loss = "–" if r["eval_loss"] is None else f"{r['eval_loss']:.3f}"
        lines.append(
            f"| {r['depth']} | {r['noise']:g} | {r['attack']} | {r['token_recall']:.2f} "
            f"| {r['chance_recall']:.2f} | {r['position_accuracy']:.2f} | {loss} |"
        )
    if reference is not None:
        lines.append(f"\nLoRA FedAvg on the same model and schedule: eval loss {reference:.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 0-1, noise 0/2, 1 round")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--depths", default="0,1,2,3")
    parser.add_argument("--noise", default="0,1,2,4", help="activation-noise ratios")
    parser.add_argument("--rounds", type=int, default=4, help="split training rounds (0: none)")
    parser.add_argument("--local-steps", type=int, default=defaults.LOCAL_STEPS)
    parser.add_argument("--rows", type=int, default=4, help="victim texts attacked")
    parser.add_argument("--length", type=int, default=24, help="tokens attacked per text")
    parser.add_argument("--optimisation-steps", type=int, default=300)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more spin on a shared machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.depths, args.noise, args.rounds, args.rows = "0,1", "0,2", 1, 2
        args.local_steps, args.optimisation_steps = 3, 100
    warnings.filterwarnings("ignore")
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    depths = [int(x) for x in args.depths.split(",")]
    noises = [float(x) for x in args.noise.split(",")]
    started = time.perf_counter()
    work = workload(args.layers, args.seed)
    reference = (
        fedavg_loss(work, args.rounds, args.local_steps, args.seed) if args.rounds > 0 else None
    )
    rows: list[dict[str, object]] = []
    for depth in depths:
        for noise in noises:
            loss, scores, seconds = run_setting(work, depth, noise, args)
            for attack, s in scores.items():
                row = {"depth": depth, "noise": noise, "attack": attack, "eval_loss": loss}
                row.update(asdict(s))
                rows.append(row)
                print(
                    f"k={depth} noise={noise:g} {attack}: recall {s.token_recall:.2f} "
                    f"(chance {s.chance_recall:.2f}) exact {s.position_accuracy:.2f} "
                    f"loss {loss} ({seconds:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    print(markdown(rows, reference))
    record = {
        "benchmark": "split_attacks",
        "quick": args.quick,
        "layers": args.layers,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "institutions": len(work.train_sets),
        "victim_rows": args.rows,
        "tokens_per_row": args.length,
        "vocab_size": work.vocab,
        "fedavg_eval_loss": reference,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": rows,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

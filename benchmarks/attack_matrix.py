"""The gradient-inversion attack matrix: every attack on every view of a client's update.

Token precision, token recall, ROUGE-L and chance recall per attack (token-set leakage from the
embedding / LM-head or its LoRA B, DAGER-style span membership on block 0's q/k/v weights or
LoRA A, DLG/TAG-style optimisation), per view (plaintext update, secagg-masked vector, secure
sum, DP secure sum at the stated ε), for batch sizes 1, 4, 16 and 2 or 10 clients, on the
embedded tiny Llama and synthetic institutions (see :mod:`proofs.attacks.matrix`).

Usage: ``python benchmarks/attack_matrix.py [--quick]``. Prints the markdown table, then one
JSON line ``{"benchmark": "attack_matrix", ..., "results": [...]}`` as the last line.
``--quick`` runs batch 1 with 2 clients only (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

from proofs.attacks.matrix import MatrixConfig, default_scenario, markdown_table, run_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 clients only")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--optimisation-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = MatrixConfig(
        batches=(1,) if args.quick else (1, 4, 16),
        clients=(2,) if args.quick else (2, 10),
        epsilon=args.epsilon,
        optimisation_steps=args.optimisation_steps,
        seed=args.seed,
    )
    started = time.perf_counter()
    scenario = default_scenario(max(config.clients), args.seed)
    rows = run_matrix(
        scenario,
        config,
        progress=lambda r: print(
            f"{r.attack} {r.view} b={r.batch} n={r.clients} recall={r.token_recall:.2f} "
            f"chance={r.chance_recall:.2f} ({r.seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        ),
    )
    print(markdown_table(rows))
    record = {
        "benchmark": "attack_matrix",
        "quick": args.quick,
        "config": asdict(config),
        "vocab_size": scenario.vocab_size,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": [asdict(r) for r in rows],
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``fedsec attack``: run the gradient-inversion attack matrix and write its table.

On the embedded default (the synthetic institutions and the tiny Llama) or on a run directory
that ``fedsec simulate`` left behind on the embedded model and data: its ``run.json`` gives the
seed and the institutions, from which the run's own base model (same tokenizer corpus, same
model seed) and the institutions' own texts are rebuilt. The global LoRA adapter the attacks
start from is the matrix's (non-zero B), not the run's. Writes
``attacks.md`` (the markdown table) and ``attacks.json`` (the rows) to ``--out`` and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from fl_core.cli import UsageError
from proofs.attacks.errors import AttackError
from proofs.attacks.matrix import (
    ATTACKS,
    MatrixConfig,
    MatrixRow,
    Scenario,
    default_scenario,
    markdown_table,
    run_matrix,
)
from proofs.attacks.views import VIEWS

RUN_FILE = "run.json"
TABLE_FILE = "attacks.md"
ROWS_FILE = "attacks.json"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    return values


def _name_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path, help="a fedsec simulate run directory")
    parser.add_argument(
        "--out", type=Path, help="where to write attacks.md/.json (default: run_dir or .)"
    )
    parser.add_argument("--batches", type=_int_list, default=(1, 4, 16))
    parser.add_argument("--clients", type=_int_list, default=(2, 10))
    parser.add_argument("--attacks", type=_name_list(ATTACKS), default=ATTACKS)
    parser.add_argument("--views", type=_name_list(VIEWS), default=VIEWS)
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP view: one round's ε")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--length", type=int, default=32, help="tokens per training text")
    parser.add_argument("--optimisation-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def _scenario(args: argparse.Namespace, n_clients: int) -> Scenario:
    if args.run_dir is None:
        return default_scenario(n_clients, args.seed)
    run_file = args.run_dir / RUN_FILE
    if not run_file.is_file():
        raise UsageError(f"{args.run_dir}: no {RUN_FILE}; is this a fedsec simulate run directory?")
    try:
        run = json.loads(run_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{run_file}: not JSON: {exc}") from exc
    model = run.get("model")
    data = run.get("data")
    if model != "embedded tiny Llama" or data != "embedded synthetic institutions":
        raise UsageError(
            f"{run_file}: the attack matrix rebuilds runs on the embedded model and data only "
            f"(this run used model={model!r}, data={data!r})"
        )
    institutions = len(run.get("institutions", []))
    if institutions < n_clients:
        raise UsageError(
            f"{run_file}: the run has {institutions} institutions, --clients asks for {n_clients}"
        )
    # Same generator and seed as the run, so the base model and the texts are the run's own.
    return default_scenario(institutions, int(run.get("seed", args.seed)))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        config = MatrixConfig(
            batches=args.batches,
            clients=args.clients,
            attacks=args.attacks,
            views=args.views,
            length=args.length,
            epsilon=args.epsilon,
            delta=args.delta,
            optimisation_steps=args.optimisation_steps,
            seed=args.seed,
        )
        scenario = _scenario(args, max(args.clients))
        started = time.perf_counter()

        def show(row: MatrixRow) -> None:
            print(
                f"  {row.attack:<18} {row.view:<12} batch {row.batch:>2} n {row.clients:>2}: "
                f"recall {row.token_recall:.2f} (chance {row.chance_recall:.2f})",
                flush=True,
            )

        rows = run_matrix(scenario, config, progress=show)
    except AttackError as exc:
        raise UsageError(str(exc)) from exc
    out: Path = args.out or args.run_dir or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / TABLE_FILE).write_text(table + "\n")
    payload = {
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
        "results": [asdict(r) for r in rows],
    }
    (out / ROWS_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    print(table)
    print(f"fedsec attack: wrote {out / TABLE_FILE} and {out / ROWS_FILE}")
    return 0

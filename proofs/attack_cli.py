"""``fedsec attack``: run the gradient-inversion attack matrix and write its table.

``--objective sft`` (the default) attacks instruction-tuning updates
(:mod:`proofs.attacks.matrix`); ``--objective dpo`` attacks DPO updates on the institutions'
preference pairs (:mod:`proofs.attacks.preference`: which tokens of the chosen and rejected
answers each view names, and on which side).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clients import defaults
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
from proofs.attacks.preference import (
    PREFERENCE_ATTACKS,
    PreferenceConfig,
    PreferenceRow,
    PreferenceScenario,
    default_preference_scenario,
    preference_table,
    run_preference_matrix,
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
    parser.add_argument(
        "--objective",
        choices=("sft", "dpo"),
        default="sft",
        help="the updates attacked: instruction tuning, or DPO on preference pairs",
    )
    parser.add_argument(
        "--batches", type=_int_list, default=(1, 4, 16), help="texts (sft) or pairs (dpo)"
    )
    parser.add_argument("--clients", type=_int_list, default=(2, 10))
    parser.add_argument(
        "--attacks",
        type=_name_list(ATTACKS + tuple(a for a in PREFERENCE_ATTACKS if a not in ATTACKS)),
        help=f"sft: {', '.join(ATTACKS)} (default: all); dpo: {', '.join(PREFERENCE_ATTACKS)} "
        "(default: both)",
    )
    parser.add_argument("--views", type=_name_list(VIEWS), default=VIEWS)
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP view: one round's ε")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--length", type=int, default=32, help="sft: tokens per training text")
    parser.add_argument("--optimisation-steps", type=int, default=300, help="sft only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


@dataclass(frozen=True)
class _EmbeddedRun:
    """What the attacks rebuild an embedded run from (the fields of its run.json)."""

    institutions: int
    seed: int
    records: int
    eval_records: int
    pairs: int
    eval_pairs: int
    preference_data: str | None


def _embedded_run(args: argparse.Namespace, n_clients: int) -> _EmbeddedRun:
    """The run.json of ``args.run_dir``, checked to be an embedded run with enough
    institutions. ``fedsec simulate`` keeps its own settings under ``simulation``; a run.json
    without them is read by its top-level ``model`` and ``data`` names."""
    run_file = args.run_dir / RUN_FILE
    if not run_file.is_file():
        raise UsageError(f"{args.run_dir}: no {RUN_FILE}; is this a fedsec simulate run directory?")
    try:
        run = json.loads(run_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{run_file}: not JSON: {exc}") from exc
    spec = run.get("simulation")
    if isinstance(spec, dict):
        model, data = spec.get("model"), spec.get("data")
        embedded = model in (None, "embedded") and data is None
    else:
        spec = run
        model, data = run.get("model"), run.get("data")
        embedded = model == "embedded tiny Llama" and data == "embedded synthetic institutions"
    if not embedded:
        raise UsageError(
            f"{run_file}: the attack matrix rebuilds runs on the embedded model and data only "
            f"(this run used model={model!r}, data={data!r})"
        )
    institutions = len(run.get("institutions", []))
    if institutions < n_clients:
        raise UsageError(
            f"{run_file}: the run has {institutions} institutions, --clients asks for {n_clients}"
        )

    def number(key: str, default: int) -> int:
        value = spec.get(key, default)
        if not isinstance(value, int):
            raise UsageError(f"{run_file}: {key} is {value!r}, not a whole number")
        return value

    return _EmbeddedRun(
        institutions=institutions,
        seed=number("seed", args.seed),
        records=number("records", defaults.RECORDS_PER_INSTITUTION),
        eval_records=number("eval_records", defaults.TEST_RECORDS_PER_INSTITUTION),
        pairs=number("pairs", defaults.PAIRS_PER_INSTITUTION),
        eval_pairs=number("eval_pairs", defaults.TEST_PAIRS_PER_INSTITUTION),
        preference_data=spec.get("preference_data"),
    )


def _scenario(args: argparse.Namespace, n_clients: int) -> Scenario:
    if args.run_dir is None:
        return default_scenario(n_clients, args.seed)
    run = _embedded_run(args, n_clients)
    # Same generator and seed as the run, so the base model and the texts are the run's own.
    return default_scenario(run.institutions, run.seed)


def _preference_scenario(args: argparse.Namespace, n_clients: int) -> PreferenceScenario:
    """The embedded preference pairs, of ``args.run_dir``'s run when given: its seed and pair
    counts draw the very pairs its institutions held."""
    pairs = max(args.batches)
    if args.run_dir is None:
        return default_preference_scenario(n_clients, args.seed, pairs)
    run = _embedded_run(args, n_clients)
    if run.preference_data is not None:
        raise UsageError(
            f"{args.run_dir / RUN_FILE}: the run's pairs came from {run.preference_data}; the "
            "DPO attack rebuilds the embedded preference pairs only"
        )
    if run.pairs < pairs:
        raise UsageError(
            f"{args.run_dir / RUN_FILE}: the run's institutions hold {run.pairs} pairs each, "
            f"--batches asks for {pairs}"
        )
    return default_preference_scenario(
        run.institutions, run.seed, run.pairs, run.eval_pairs, run.records, run.eval_records
    )


def _run_preference(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    attacks = args.attacks or PREFERENCE_ATTACKS
    wrong = [a for a in attacks if a not in PREFERENCE_ATTACKS]
    if wrong:
        raise UsageError(
            f"--attacks {','.join(wrong)}: not an attack on a DPO update; with --objective dpo "
            f"choose from {', '.join(PREFERENCE_ATTACKS)}"
        )
    config = PreferenceConfig(
        batches=args.batches,
        clients=args.clients,
        attacks=attacks,
        views=args.views,
        epsilon=args.epsilon,
        delta=args.delta,
        seed=args.seed,
    )
    scenario = _preference_scenario(args, max(args.clients))

    def show(row: PreferenceRow) -> None:
        print(
            f"  {row.attack:<14} {row.view:<12} pairs {row.batch:>2} n {row.clients:>2}: "
            f"chosen-only {row.recall['chosen_only']:.2f}, rejected-only "
            f"{row.recall['rejected_only']:.2f}, prompt-only {row.recall['prompt_only']:.2f}",
            flush=True,
        )

    rows = run_preference_matrix(scenario, config, progress=show)
    return preference_table(rows), {
        "objective": "dpo",
        "config": asdict(config),
        "results": [asdict(r) for r in rows],
    }


def _run_sft(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    attacks = args.attacks or ATTACKS
    wrong = [a for a in attacks if a not in ATTACKS]
    if wrong:
        raise UsageError(
            f"--attacks {','.join(wrong)}: an attack on a DPO update; add --objective dpo, or "
            f"choose from {', '.join(ATTACKS)}"
        )
    config = MatrixConfig(
        batches=args.batches,
        clients=args.clients,
        attacks=attacks,
        views=args.views,
        length=args.length,
        epsilon=args.epsilon,
        delta=args.delta,
        optimisation_steps=args.optimisation_steps,
        seed=args.seed,
    )
    scenario = _scenario(args, max(args.clients))

    def show(row: MatrixRow) -> None:
        print(
            f"  {row.attack:<18} {row.view:<12} batch {row.batch:>2} n {row.clients:>2}: "
            f"recall {row.token_recall:.2f} (chance {row.chance_recall:.2f})",
            flush=True,
        )

    rows = run_matrix(scenario, config, progress=show)
    return markdown_table(rows), {
        "objective": "sft",
        "config": asdict(config),
        "results": [asdict(r) for r in rows],
    }


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        table, payload = _run_preference(args) if args.objective == "dpo" else _run_sft(args)
    except AttackError as exc:
        raise UsageError(str(exc)) from exc
    out: Path = args.out or args.run_dir or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE_FILE).write_text(table + "\n")
    payload["seconds"] = round(time.perf_counter() - started, 1)
    (out / ROWS_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    print(table)
    print(f"fedsec attack: wrote {out / TABLE_FILE} and {out / ROWS_FILE}")
    return 0

"""benchmarks/fl_vs_isolated.py: the arms get the compute the issue states, lr chosen on val."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from clients.data import TokenizedDataset

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "fl_vs_isolated.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fl_vs_isolated", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_centralized_arm_does_the_federations_work_in_its_sequential_steps() -> None:
    budget = bench.Budget(4, 8, 10, 16, 10)
    fed_examples = 4 * 8 * 10 * 16
    assert budget.federation_examples == fed_examples
    assert budget.centralized == bench.Arm(steps=80, batch_size=64)
    assert budget.centralized.examples == fed_examples
    # The old baseline: same examples, but N times the sequential steps.
    assert budget.centralized_sequential == bench.Arm(steps=320, batch_size=16)
    assert budget.centralized_sequential.examples == fed_examples
    # Each institution alone: its own share of the federation's work.
    assert budget.isolated == bench.Arm(steps=80, batch_size=16)


def test_fedavg_arm_keeps_the_steps_per_institution() -> None:
    budget = bench.Budget(4, 80, 1, 16, 10)
    assert budget.fedavg_rounds == 8
    assert budget.fedavg_rounds * budget.fedavg_local_steps == budget.steps_per_institution
    with pytest.raises(bench.BudgetError, match="do not divide"):
        bench.Budget(4, 80, 1, 16, 7)
    with pytest.raises(bench.BudgetError, match="rounds must be >= 1"):
        bench.Budget(4, 0, 1, 16, 1)


def _records(domain: int, n: int) -> TokenizedDataset:
    ids = tuple(np.array([domain, i]) for i in range(n))
    return TokenizedDataset(ids, ids, 0)


def _keys(data: TokenizedDataset) -> list[tuple[int, ...]]:
    return [tuple(x.tolist()) for x in data.input_ids]


def test_split_eval_halves_every_domain_disjointly() -> None:
    sets = {"a": _records(1, 6), "b": _records(2, 5)}
    val, test = bench.split_eval(sets)
    assert len(val) == 3 + 2 and len(test) == 3 + 3
    assert sorted(_keys(val) + _keys(test)) == sorted(_keys(sets["a"]) + _keys(sets["b"]))
    assert not set(_keys(val)) & set(_keys(test))
    assert {k[0] for k in _keys(val)} == {1, 2}  # both domains in the validation half
    with pytest.raises(bench.BudgetError, match="need 2"):
        bench.split_eval({"a": _records(1, 1)})


def test_tune_selects_on_validation_not_test() -> None:
    # lr 0.01 looks best on test, lr 0.02 on validation: the validation choice must win.
    scores = {0.01: bench.Scored(val=3.0, test=1.0), 0.02: bench.Scored(val=2.0, test=2.5)}

    def run(lr: float, seed: int) -> np.ndarray:
        return np.array([lr])

    best, grid = bench.tune([0.01, 0.02], [0], run, lambda v: scores[float(v[0])])
    assert best == 0.02
    assert {lr: (s.val, s.test) for lr, s in grid.items()} == {0.01: (3.0, 1.0), 0.02: (2.0, 2.5)}


def test_tune_selects_on_the_mean_over_seeds() -> None:
    # Seed 1 alone would pick 0.02 (a lucky run); the mean over both seeds picks 0.01.
    val = {(0.01, 1): 2.9, (0.01, 2): 2.8, (0.02, 1): 2.85, (0.02, 2): 3.1}

    def run(lr: float, seed: int) -> np.ndarray:
        return np.array([lr, seed])

    def score(v: np.ndarray) -> bench.Scored:
        return bench.Scored(val=val[(float(v[0]), int(v[1]))], test=float(v[1]))

    best, grid = bench.tune([0.01, 0.02], [1, 2], run, score)
    assert best == 0.01
    assert grid[0.01].val == pytest.approx(2.85) and grid[0.01].test == pytest.approx(1.5)
    assert grid[0.01].runs == ((2.9, 1.0), (2.8, 2.0))
    with pytest.raises(bench.BudgetError, match="no runs"):
        bench.mean_scored([])


def test_parse_lrs_refuses_bad_grids() -> None:
    assert bench.parse_lrs("0.01, 0.03") == [0.01, 0.03]
    for bad in ("", "0.01,x", "0.01,-1"):
        with pytest.raises(bench.BudgetError, match="--lrs"):
            bench.parse_lrs(bad)


def test_each_institution_keeps_its_own_validation_and_test_halves() -> None:
    sets = {"a": _records(1, 6), "b": _records(2, 5)}
    val, test = bench.split_own(sets)
    assert {k[0] for k in _keys(val["a"]) + _keys(test["a"])} == {1}
    assert len(val["b"]) == 2 and len(test["b"]) == 3
    assert not set(_keys(val["a"])) & set(_keys(test["a"]))


def test_the_base_is_the_pretrained_model_when_its_extra_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "named_model_available", lambda _name: False)
    model, why = bench.choose_model(None)
    assert model == "embedded" and "not yet a fine-tuning result" in why
    monkeypatch.setattr(bench, "named_model_available", lambda _name: True)
    assert bench.choose_model(None)[0] == "smollm2-135m"
    assert bench.choose_model("embedded") == ("embedded", "asked for with --model")


def test_mean_scored_averages_each_institutions_loss() -> None:
    runs = [bench.Scored(1.0, 2.0, (), {"a": 3.0}), bench.Scored(2.0, 4.0, (), {"a": 5.0})]
    assert bench.mean_scored(runs).own == {"a": 4.0}

"""benchmarks/dpo_alignment.py: both arms start from the stage's adapter with the same compute."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "dpo_alignment.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_dpo_alignment", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_scores_both_arms_per_institution(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        result = _load().main(["--quick", "--threads", "1", "--institutions", "3"])
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    names = {"cardiology-1", "paediatrics-1", "retail-banking-1"}
    assert set(result["federated_accuracy"]) == set(result["isolated_accuracy"]) == names
    (run,) = result["runs"]
    for name in names:
        isolated = run["isolated"][name]
        # The same rounds as the federated stage (--quick: 1 SFT round, then 1 DPO round).
        assert len(isolated["accuracy_by_round"]) == 1 and isolated["best_round"] == 1
        kinds = run["federated"][name]["accuracy_by_kind"]
        assert set(kinds) <= {"rule", "fact"} and all(0 <= v <= 1 for v in kinds.values())
        # How far the round moved the adapter: the institution's own step, and the federated one.
        assert len(isolated["step_norm_by_round"]) == 1 and isolated["step_norm_by_round"][0] > 0
        lead = result["federated_lead"][name]
        expected = run["federated"][name]["accuracy"] - isolated["accuracy"]
        assert lead["mean"] == pytest.approx(expected, abs=1e-4)
        assert lead["low"] <= lead["mean"] <= lead["high"]
        assert result["federated_verdict"][name] in {"wins", "tie", "trails"}
        assert set(result["isolated_accuracy_by_kind"][name]) == set(kinds)
    assert (
        len(run["federated_step_norm_by_round"]) == 1 and run["federated_step_norm_by_round"][0] > 0
    )
    assert len(run["secure_vs_plain_over_bound_by_round"]) == 2
    assert result["secure_vs_plain_within_bound_every_dpo_round"] is True


def test_the_verdict_needs_the_interval_of_the_paired_lead_to_exclude_zero() -> None:
    bench = _load()
    rng = np.random.default_rng(1)
    # Per-pair differences (federated minus alone) of two seeds: +1, -1 or 0 per pair.
    ahead = [rng.choice([1.0, 0.0, -1.0], p=[0.3, 0.6, 0.1], size=400) for _ in range(2)]
    interval = bench.lead_interval(ahead)
    assert interval["low"] > 0 and bench.verdict(interval) == "wins"
    assert interval["mean"] == pytest.approx(np.mean([d.mean() for d in ahead]), abs=1e-4)
    behind = [-d for d in ahead]
    assert bench.verdict(bench.lead_interval(behind)) == "trails"
    # A lead of +0.02 on 128 pairs, one seed, is within the noise: a tie, not a win.
    small = [np.concatenate([np.ones(10), -np.ones(7), np.zeros(111)])]
    interval = bench.lead_interval(small)
    assert interval["mean"] > 0 and interval["low"] < 0 < interval["high"]
    assert bench.verdict(interval) == "tie"
    # Seeds that disagree widen the interval: each alone would be a win or a loss.
    split = [np.full(300, 0.2), np.full(300, -0.2)]
    assert bench.verdict(bench.lead_interval(split)) == "tie"

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


def test_quick_run_scores_every_arm_per_institution(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        bench = _load()
        result = bench.main(
            ["--quick", "--threads", "1", "--institutions", "3", "--adapt-rounds", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    names = {"cardiology-1", "paediatrics-1", "retail-banking-1"}
    assert set(result["federated_accuracy"]) == set(result["isolated_accuracy"]) == names
    (run,) = result["runs"]
    for name in names:
        isolated, adapted = run["isolated"][name], run["adapted"][name]
        # The same rounds as the federated stage (--quick: 1 SFT round, then 2 DPO rounds);
        # the adapted arm trains alone for the last one only, from the federation's adapter.
        assert len(isolated["accuracy_by_round"]) == 2 and isolated["best_round"] in (1, 2)
        assert len(adapted["accuracy_by_round"]) == 1 and adapted["best_round"] == 2
        kinds = run["federated"][name]["accuracy_by_kind"]
        assert set(kinds) <= {"rule", "fact"} and all(0 <= v <= 1 for v in kinds.values())
        # How far each round moved the adapter: the institution's own step, and the federated one.
        assert len(isolated["step_norm_by_round"]) == 2 and min(isolated["step_norm_by_round"]) > 0
        for arm, accuracy in (("federated", run["federated"][name]["accuracy"]),
                              ("adapted", adapted["accuracy"])):  # fmt: skip
            lead = result[f"{arm}_lead"][name]
            assert lead["mean"] == pytest.approx(accuracy - isolated["accuracy"], abs=1e-4)
            assert lead["low"] <= lead["mean"] <= lead["high"]
            assert result[f"{arm}_verdict"][name] == bench.verdict(lead)
        assert set(result["isolated_accuracy_by_kind"][name]) == set(kinds)
    assert len(run["federated_step_norm_by_round"]) == 2
    assert min(run["federated_step_norm_by_round"]) > 0
    assert len(run["secure_vs_plain_over_bound_by_round"]) == 3
    assert result["secure_vs_plain_within_bound_every_dpo_round"] is True


def test_adapt_rounds_must_leave_the_federation_a_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _load().main(["--quick", "--adapt-rounds", "2"])
    assert exit_info.value.code == 2
    assert "--adapt-rounds must be in [0, --dpo-rounds) = [0, 2)" in capsys.readouterr().err


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

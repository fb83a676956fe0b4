"""benchmarks/dpo_alignment.py: both arms start from the stage's adapter with the same compute."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
        assert lead["mean"] == lead["min"] == lead["max"] == pytest.approx(expected, abs=1e-4)
        assert set(result["isolated_accuracy_by_kind"][name]) == set(kinds)
    assert (
        len(run["federated_step_norm_by_round"]) == 1 and run["federated_step_norm_by_round"][0] > 0
    )
    assert len(run["secure_vs_plain_over_bound_by_round"]) == 2
    assert result["secure_vs_plain_within_bound_every_dpo_round"] is True

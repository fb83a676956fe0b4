"""benchmarks/gpu_recipe.py runs end to end (on the CPU, tiny) and refuses a missing GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_recipe.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_recipe", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_a_tiny_cpu_run_reports_steps_per_second_and_peak_memory() -> None:
    argv = ["--model", "embedded", "--device", "cpu", "--rounds", "1", "--local-steps", "2"]
    argv += ["--institutions", "3", "--records", "16", "--eval-records", "4"]
    argv += ["--batch-size", "4", "--grad-accum", "2", "--max-length", "64", "--lora-rank", "2"]
    result = bench.main(argv)
    assert result["steps_per_s"] > 0 and result["tokens_per_s"] > 0
    assert result["peak_memory_mib"] > 0 and result["peak_memory_kind"] == "process max RSS"
    assert result["device"] == "cpu" and result["precision"] == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--model", "embedded"])
    assert info.value.code == 2 and "no CUDA GPU here" in capsys.readouterr().err

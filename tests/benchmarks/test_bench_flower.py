"""benchmarks/flower_compare.py and flower_scale.py: one JSON line, or "skipped" without Flower."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", ["flower_compare.py", "flower_scale.py"])
def test_without_flower_the_benchmark_says_skipped(script: str) -> None:
    code = (
        "import sys, runpy; sys.modules['flwr'] = None; "
        f"runpy.run_path({str(BENCH / script)!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert "fedsec[flower]" in line["skipped"]


def test_compare_runs_both_protocols_with_a_dropout(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(
        "flwr", reason="needs Flower, the optional extra: pip install 'fedsec[flower]'"
    )
    module = runpy.run_path(str(BENCH / "flower_compare.py"))
    assert module["main"](["--clients", "5", "--dims", "1000", "--dropouts", "0.2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = line["results"][0]
    assert result["fedsec"]["contributors"] == 4
    assert set(result["flower"]["stages"]) == {"setup", "share_keys", "collect_masked_vectors",
                                             "unmask"}  # fmt: skip
    assert line["flower_over_fedsec"]["upload_bytes"][0] > 0

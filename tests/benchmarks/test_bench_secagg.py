"""benchmarks/secagg_bench.py and server_unmask_scale.py run end to end at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures: dict[str, object] = json.loads(done.stdout)
    return figures


def test_secagg_bench_pairs_every_client_and_replays_the_server() -> None:
    figures = _run("secagg_bench.py", "--clients", "8", "--dim", "5000", "--repeats", "3")
    assert figures["exact"] is True
    spread = figures["spread"]
    assert isinstance(spread, dict)
    assert spread["client_mask_vs_prg_per_pair"]["n"] == figures["contributors"] == 7
    assert spread["server_unmask_s"]["n"] == spread["prg_limit_server_s"]["n"] == 3
    for key in ("client_mask_vs_prg", "server_unmask_vs_prg", "server_unmask_vs_prg_cpu"):
        assert isinstance(figures[key], float) and figures[key] > 0


def test_server_unmask_scale_runs_on_the_pool() -> None:
    figures = _run(
        "server_unmask_scale.py",
        "--clients",
        "40",
        "--dim",
        "3001",
        "--workers",
        "2",
        "--repeats",
        "2",
        "--client-sample",
        "5",
    )
    assert figures["exact"] is True and figures["workers"] == 2
    for key in ("server_unmask_s", "prg_limit_s", "reconstruct_s", "remove_masks_s"):
        values = figures[key]
        assert isinstance(values, dict) and values["one_core"] > 0 and values["all_cores"] > 0
    peaks = figures["peak_rss_mb"]
    assert isinstance(peaks, dict) and len(peaks["each_worker"]) == 2

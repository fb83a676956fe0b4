"""``fedsec simulate --mode split`` end to end: run directory, audit, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import clients.defaults as defaults
from clients.model_factory import TinyLlamaSpec
from fl_core.adapter_io import load_adapter
from fl_core.cli import main
from fl_core.federation import Federation

#: Two blocks: the institutions keep block 0, the server trains block 1.
TWO = TinyLlamaSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TINY = ["--records", "24", "--eval-records", "6", "--batch-size", "8", "--generate", "0"]
ARGV = ["simulate", "--mode", "split", "--institutions", "3", "--local-steps", "2", *TINY]


@pytest.fixture(autouse=True)
def tiny_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "TEST_RECORDS_PER_DOMAIN", 6)
    monkeypatch.setattr(defaults, "MODEL", TWO)


def test_split_run_directory_passes_the_audit_and_says_what_the_server_saw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*ARGV, "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "split learning: institutions keep the embedding, 1 bottom" in printed
    config = json.loads((out / "run.json").read_text())
    assert config["mode"] == "split" and config["split"]["server_blocks"] == [1, 1]
    assert config["dim"] == config["split"]["client_part"]
    assert "Training mode: **split learning**" in (out / "report.md").read_text()
    # Every round's adapter holds both parts: the server's block moved too.
    first, _ = load_adapter(out / "adapters" / "round_0001")
    initial_b = {k: v for k, v in first.items() if ".layers.1." in k and "lora_B" in k}
    assert initial_b and all(np.abs(v).max() > 0 for v in initial_b.values())
    assert main(["audit", str(out)]) == 0
    privacy = (out / "privacy.md").read_text()
    assert "## Split learning" in privacy and "loss gradient at the top cut" in privacy
    assert json.loads((out / "privacy.json").read_text())["passed"] is True


def test_split_resume_carries_the_server_part(tmp_path: Path) -> None:
    argv = [*ARGV, "--rounds", "3", "--quiet"]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0
    cut = tmp_path / "cut"
    real = Federation.run_round

    def stop_in_round_three(self: Federation, r: int, dropouts: tuple[str, ...] = ()) -> object:
        if r == 2:
            raise KeyboardInterrupt
        return real(self, r, dropouts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Federation, "run_round", stop_in_round_three)
        assert main([*argv, "--out", str(cut)]) == 130
    assert main(["simulate", "--resume", str(cut), "--quiet"]) == 0
    a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    # Round 3 trains from the server part saved after round 2 (a fresh one would differ).
    for x, y in zip(a, b, strict=True):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--client-top", "1"], "--client-top: only with --mode split"),
        (["--mode", "split", "--strategy", "scaffold"], "does not offer SCAFFOLD"),
        (["--mode", "split", "--activation-noise", "-1"], "--activation-noise must be >= 0"),
        (["--mode", "split", "--client-bottom", "2"], "leaves the server none"),
        (["--mode", "split", "--local-epochs", "1"], "counts local steps"),
    ],
)
def test_split_flags_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["simulate", "--institutions", "3", "--rounds", "1", *TINY, *extra]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_core.cli import main


def test_fedsec_attack_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "attack",
            "--out",
            str(tmp_path),
            "--batches",
            "1",
            "--clients",
            "2",
            "--attacks",
            "token_leakage,span",
            "--views",
            "plaintext,masked",
        ]
    )
    assert code == 0
    table = (tmp_path / "attacks.md").read_text()
    assert table.startswith("| attack | view |")
    rows = json.loads((tmp_path / "attacks.json").read_text())["results"]
    assert {(r["attack"], r["view"]) for r in rows} == {
        (a, v) for a in ("token_leakage", "span") for v in ("plaintext", "masked")
    }
    assert "fedsec attack: wrote" in capsys.readouterr().out


def test_fedsec_attack_refuses_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["attack", str(tmp_path), "--batches", "1", "--clients", "2"]) == 2
    assert "run.json" in capsys.readouterr().err


def test_fedsec_attack_rebuilds_an_embedded_run(tmp_path: Path) -> None:
    # The fields fedsec simulate writes to run.json that the attack reads.
    run = {
        "institutions": ["cardiology-1", "paediatrics-1"],
        "seed": 0,
        "model": "embedded tiny Llama",
        "data": "embedded synthetic institutions",
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    args = ["attack", str(tmp_path), "--batches", "1", "--clients", "2"]
    assert main([*args, "--attacks", "token_leakage", "--views", "plaintext"]) == 0
    (row,) = json.loads((tmp_path / "attacks.json").read_text())["results"]
    assert row["token_recall"] >= 0.8
    assert main([*args, "--clients", "3"]) == 2  # the run has only two institutions
    run["model"] = "/models/llama-7b"
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert main(args) == 2


def test_fedsec_attack_rejects_an_unknown_attack() -> None:
    with pytest.raises(SystemExit):
        main(["attack", "--attacks", "telepathy"])

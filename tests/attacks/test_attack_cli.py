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


def test_fedsec_attack_rejects_an_unknown_attack() -> None:
    with pytest.raises(SystemExit):
        main(["attack", "--attacks", "telepathy"])

"""The attack suite on a DPO update: which tokens of a preference pair leak, view by view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_core.cli import main
from proofs.attacks.errors import AttackInputError
from proofs.attacks.preference import preference_attack


@pytest.fixture(scope="module")
def dpo_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """``fedsec attack --objective dpo``: both attacks, plaintext and masked, 4 pairs, 2 clients."""
    out = tmp_path_factory.mktemp("dpo-attack")
    argv = ["attack", "--objective", "dpo", "--out", str(out), "--batches", "4"]
    assert main([*argv, "--clients", "2", "--views", "plaintext,masked"]) == 0
    table = (out / "attacks.md").read_text()
    assert table.startswith("| attack | view | pairs |") and "right side" in table
    payload = json.loads((out / "attacks.json").read_text())
    assert payload["objective"] == "dpo"
    return {(r["attack"], r["view"]): r for r in payload["results"]}


def test_a_plaintext_dpo_update_names_both_answers_and_the_side_of_each(
    dpo_rows: dict[tuple[str, str], dict[str, Any]],
) -> None:
    row = dpo_rows[("preference", "plaintext")]
    # The wording the institution prefers and the wording it rules out both leak ...
    assert row["recall"]["chosen_only"] >= 0.5
    assert row["recall"]["rejected_only"] >= 0.8
    # ... and which of the two each token was on, well above a coin flip.
    assert row["right_side"] >= 0.7
    # The prompts are never labels, and the answers' shared beginning cancels: no prompt token.
    assert row["recall"]["prompt_only"] == 0.0
    assert row["precision"] >= 0.5
    # The generic token-set attack also reads a DPO update, without the sides.
    generic = dpo_rows[("token_leakage", "plaintext")]
    assert generic["recall"]["rejected_only"] >= 0.5 and generic["right_side"] is None


def test_a_masked_dpo_update_names_nothing(
    dpo_rows: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for attack in ("preference", "token_leakage"):
        row = dpo_rows[(attack, "masked")]
        assert row["named"] == 0 and row["right_side"] is None
        assert all(v == 0.0 for v in row["recall"].values())


def test_the_preference_attack_reads_the_sign_of_each_head_row() -> None:
    # A head LoRA B of 6 tokens x rank 2 whose rows 1 and 4 are pulled along (+) and against
    # (-) the public direction, the rest a small bulk around it.
    rng = np.random.default_rng(0)
    bulk = rng.normal(0.0, 0.01, (64, 2))
    bulk[1] = [1.0, 1.0]
    bulk[4] = [-1.0, -1.0]
    update = {"base_model.model.lm_head.lora_B.weight": bulk, "x.lora_A.weight": np.ones((2, 3))}
    named = preference_attack(update, np.array([1.0, 1.0]), vocab_size=64)
    assert named.chosen == {1} and named.rejected == {4}
    with pytest.raises(AttackInputError, match="LoRA B of the LM head"):
        preference_attack({"x.lora_A.weight": np.ones((2, 3))}, np.ones(2), 64)
    with pytest.raises(AttackInputError, match="direction has 3 coordinates"):
        preference_attack(update, np.ones(3), 64)


def test_fedsec_attack_dpo_refuses_what_it_cannot_attack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["attack", "--objective", "dpo", "--batches", "1", "--clients", "2"]
    assert main([*args, "--attacks", "span", "--out", str(tmp_path)]) == 2
    assert "not an attack on a DPO update" in capsys.readouterr().err
    assert main(["attack", "--attacks", "preference", "--out", str(tmp_path)]) == 2
    assert "add --objective dpo" in capsys.readouterr().err
    run = {
        "institutions": ["cardiology-1", "paediatrics-1"],
        "seed": 0,
        "model": "embedded tiny Llama",
        "data": "embedded synthetic institutions",
        "pairs": 2,
        "preference_data": None,
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert main([*args[:3], str(tmp_path), "--batches", "4", "--clients", "2"]) == 2
    assert "hold 2 pairs each, --batches asks for 4" in capsys.readouterr().err
    run["preference_data"] = "/data/pairs"
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert main([*args[:3], str(tmp_path), "--batches", "1", "--clients", "2"]) == 2
    assert "embedded preference pairs only" in capsys.readouterr().err
    # fedsec simulate's own settings, under "simulation": a pretrained run cannot be rebuilt.
    run["simulation"] = {"model": "smollm2-135m", "data": None, "seed": 0, "pairs": 8}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert main([*args[:3], str(tmp_path), "--batches", "1", "--clients", "2"]) == 2
    assert "model='smollm2-135m'" in capsys.readouterr().err


def test_fedsec_attack_dpo_rebuilds_an_embedded_run(tmp_path: Path) -> None:
    run = {
        "institutions": ["cardiology-1", "paediatrics-1"],
        "seed": 0,
        "model": "embedded tiny Llama",
        "data": "embedded synthetic institutions",
        "pairs": 8,
        "eval_pairs": 4,
        "preference_data": None,
    }
    (tmp_path / "run.json").write_text(json.dumps(run))
    argv = ["attack", str(tmp_path), "--objective", "dpo", "--batches", "1", "--clients", "2"]
    assert main([*argv, "--attacks", "preference", "--views", "plaintext"]) == 0
    (row,) = json.loads((tmp_path / "attacks.json").read_text())["results"]
    assert row["recall"]["chosen_only"] >= 0.5 and row["recall"]["prompt_only"] == 0.0

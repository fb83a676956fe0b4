"""``fedsec simulate --stage dpo|sft+dpo``: alignment rounds through the same secure round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import clients.defaults as defaults
from clients.model_factory import TinyLlamaSpec
from clients.simulation import prepare
from clients.workload import SimulationSpec
from fl_core.cli import main
from fl_core.federation import Federation
from fl_core.recipe import EMBEDDED

SMALL = TinyLlamaSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
TINY = ["--records", "24", "--eval-records", "6", "--batch-size", "8", "--generate", "0"]
PAIRS = ["--pairs", "16", "--eval-pairs", "8"]
SCORE_FIELDS = {"accuracy", "margin", "chosen_reward", "rejected_reward", "logp_accuracy", "pairs"}


@pytest.fixture()
def tiny_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "TEST_RECORDS_PER_DOMAIN", 6)
    monkeypatch.setattr(defaults, "MODEL", SMALL)


def _records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("tiny_defaults")
def test_sft_then_dpo_in_one_run_is_aggregated_securely_and_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "3", "--local-steps", "2", *TINY]
    argv += ["--stage", "sft+dpo", "--dpo-rounds", "2", "--dpo-lr", "0.005", *PAIRS]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "stage sft+dpo: 1 SFT then 2 DPO rounds (sigmoid, beta 0.5" in printed
    assert "round 2/3 [dpo]" in printed and "preference accuracy" in printed
    records = _records(out)
    assert [r["objective"] for r in records] == ["sft", "dpo", "dpo"]
    assert [r["lr"] for r in records] == [EMBEDDED.lr, 0.005, 0.005]
    institutions = {"cardiology-1", "paediatrics-1", "retail-banking-1"}
    # The last SFT round's adapter is the DPO stage's start: scored at chance by definition.
    start = records[0]["preference"]
    assert isinstance(start, dict) and set(start) == institutions | {"pooled"}
    assert all(s["accuracy"] == 0.5 and s["margin"] == 0.0 for s in start.values())
    for r in records:
        assert r["secure_vs_plain_max_abs_diff"] <= r["quantization_bound"]  # type: ignore[operator]
        assert set(r["eval_loss"]) == institutions  # type: ignore[arg-type]
    for r in records[1:]:
        scores = r["preference"]
        assert isinstance(scores, dict) and set(scores["pooled"]) == SCORE_FIELDS
        assert scores["pooled"]["pairs"] == 3 * 8
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == {
        "stage": "sft+dpo",
        "sft_rounds": 1,
        "dpo_rounds": 2,
        "dpo_start": 1,
        "beta": 0.5,  # the embedded default
        "loss": "sigmoid",
        "reference": "sft",
        "lr": 0.005,
    }
    assert run["pairs"] == dict.fromkeys(institutions, 16)
    report = (out / "report.md").read_text()
    assert "## Preference alignment (DPO)" in report and "| **pooled** | 0.5000 |" in report
    assert "| 1 | dpo | 3 |" in report and "within the bound" in report
    assert (out / "loss.png").is_file()
    assert main(["audit", str(out)]) == 0
    # The attack suite rebuilds the run's base model and pairs from run.json.
    attack = ["attack", str(out), "--objective", "dpo", "--batches", "4", "--clients", "2"]
    assert main([*attack, "--views", "plaintext,masked", "--attacks", "preference"]) == 0
    rows = {r["view"]: r for r in json.loads((out / "attacks.json").read_text())["results"]}
    plain = rows["plaintext"]["recall"]
    assert plain["chosen_only"] >= 0.5 and plain["rejected_only"] >= 0.5
    assert plain["prompt_only"] <= 0.1  # prompts are never labels: a stray outlier at most
    assert rows["masked"]["named"] == 0


@pytest.mark.usefixtures("tiny_defaults")
@pytest.mark.parametrize(
    "privacy", [["--backend", "ckks"], ["--dp-epsilon", "8", "--dp-clip", "0.5"]], ids=str
)
def test_dpo_rounds_under_ckks_or_dp_match_the_plaintext_sum_and_pass_the_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], privacy: list[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "2", "--local-steps", "1", *TINY]
    argv += ["--stage", "dpo", "--dpo-lr", "0.005", *PAIRS, *privacy, "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    records = _records(out)
    assert [r["objective"] for r in records] == ["dpo", "dpo"]
    for r in records:
        # CKKS: within its decryption bound; DP: the secure sum is the plaintext ring sum of
        # the same noised vectors, exactly (bound 0).
        assert r["secure_vs_plain_max_abs_diff"] <= r["quantization_bound"]  # type: ignore[operator]
    assert main(["audit", str(out)]) == 0
    assert "all checks passed" in capsys.readouterr().out
    audit = json.loads((out / "privacy.json").read_text())
    assert audit["passed"] and audit["differential_privacy"]["enabled"] == (
        "--dp-epsilon" in privacy
    )
    if "--dp-epsilon" in privacy:  # both DPO rounds accounted, within the run's target
        assert audit["differential_privacy"]["epsilon_total"] <= 8.0


@pytest.mark.usefixtures("tiny_defaults")
def test_dpo_alone_scores_the_untrained_adapter_and_resumes_with_its_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--institutions", "3", "--rounds", "2", "--local-steps", "2", *TINY]
    argv += ["--stage", "dpo", "--dpo-reference", "sft", "--quiet", *PAIRS]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0
    initial = json.loads((whole / "initial.json").read_text())
    assert initial["preference"]["pooled"]["accuracy"] == 0.5
    cut = tmp_path / "cut"
    real = Federation.run_round

    def stop_in_round_two(self: Federation, r: int, dropouts: tuple[str, ...] = ()) -> object:
        if r == 1:
            raise KeyboardInterrupt
        return real(self, r, dropouts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Federation, "run_round", stop_in_round_two)
        assert main([*argv, "--out", str(cut)]) == 130
    capsys.readouterr()
    assert main(["simulate", "--resume", str(cut), "--quiet"]) == 0
    a, b = _records(whole), _records(cut)
    # The resumed run kept the stage's reference (the untrained adapter) and each client's
    # position in its pairs: the same scores as the run that was not interrupted.
    for x, y in zip(a, b, strict=True):
        assert x["objective"] == y["objective"] == "dpo"
        px, py = x["preference"], y["preference"]
        assert isinstance(px, dict) and isinstance(py, dict)
        assert px["pooled"]["accuracy"] == pytest.approx(py["pooled"]["accuracy"], abs=0.05)
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-3)


def _write_pairs(folder: Path, name: str, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        if i % 2:
            record = {
                "prompt": [{"role": "user", "content": f"Is item {i} safe?"}],
                "chosen": [{"role": "assistant", "content": f"Item {i} is safe; check it."}],
                "rejected": [{"role": "assistant", "content": f"Item {i} is whatever."}],
                "site": name,
            }
        else:
            record = {"prompt": f"Rate item {i}.", "chosen": "Rated by protocol.",
                      "rejected": "Rated by guess.", "site": name}  # fmt: skip
        lines.append(json.dumps(record))
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.usefixtures("tiny_defaults")
def test_preference_files_without_sft_data_train_sft_on_the_chosen_answers(
    tmp_path: Path,
) -> None:
    for name in ("north", "south", "west"):
        _write_pairs(tmp_path / "pairs", name, 12)
    out = tmp_path / "run"
    argv = ["simulate", "--rounds", "2", "--local-steps", "1", "--batch-size", "4"]
    argv += ["--stage", "sft+dpo", "--preference-data", str(tmp_path / "pairs"), "--quiet"]
    assert main([*argv, "--generate", "0", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["institutions"] == ["north", "south", "west"]
    assert run["data"].startswith("the chosen answers of")
    # The last tenth of each institution's pairs is held out (12 -> 11 + 1).
    assert run["pairs"] == {"north": 11, "south": 11, "west": 11}
    assert [r["objective"] for r in _records(out)] == ["sft", "dpo"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stage", "dpo", "--dpo-rounds", "2"], "dpo_rounds splits the rounds of stage sft+dpo"),
        (["--stage", "sft+dpo", "--rounds", "1"], "needs 1 <= dpo_rounds < 1"),
        (["--stage", "sft+dpo", "--rounds", "4", "--dpo-rounds", "4"], "1 <= dpo_rounds < 4"),
        (["--stage", "rlhf"], "--stage: stage must be one of sft, dpo, sft+dpo"),
        (["--dpo-beta", "0"], "--dpo-beta: dpo_beta must be > 0"),
        (["--dpo-loss", "hinge"], "--dpo-loss: dpo_loss must be one of sigmoid, ipo"),
        (["--pairs", "8"], "go with --stage dpo or sft+dpo"),
        (["--stage", "dpo", "--pairs", "0"], "--pairs must be >= 1"),
        (["--stage", "dpo", "--preference-data", "/nonexistent"], "--preference-data /nonex"),
    ],
)
def test_bad_stage_flags_give_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["simulate", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsec simulate: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_sft_data_without_preference_pairs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    argv = ["simulate", "--stage", "dpo", "--data", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "needs the institutions' preference pairs: give --preference-data" in (
        capsys.readouterr().err
    )


@pytest.mark.usefixtures("tiny_defaults")
def test_dpo_rounds_walk_the_pairs_and_sft_rounds_the_examples() -> None:
    recipe = EMBEDDED.with_overrides(
        {"local_steps": 2, "batch_size": 8, "stage": "sft+dpo", "dpo_rounds": 1}
    )
    fed, trainer = prepare(
        SimulationSpec(3, 2, recipe, records=24, eval_records=6, pairs=16, eval_pairs=4)
    )
    fed.run()
    assert trainer.batches_drawn == {name: 2 for name in fed.ids}
    assert trainer.pair_batches_drawn == {name: 2 for name in fed.ids}
    assert trainer.dpo_start is not None

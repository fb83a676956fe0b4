"""``fedsec simulate`` end to end on a tiny config (3 institutions, 2 rounds, 2 local steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import clients.defaults as defaults
from clients.data import AlpacaRecord, write_alpaca_jsonl
from clients.model_factory import TinyLlamaSpec, build_tiny_llama, build_tokenizer, save_base
from clients.simulate_cli import SimulationSpec, prepare
from fl_core.adapter_io import load_adapter
from fl_core.cli import main

SMALL = TinyLlamaSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
METRIC_FIELDS = {
    "round",
    "cohort",
    "contributors",
    "train_loss",
    "eval_loss",
    "eval_loss_mean",
    "aggregation_s",
    "upload_bytes",
    "secure_vs_plain_max_abs_diff",
    "quantization_bound",
    "clip_fraction",
}


@pytest.fixture()
def tiny_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "RECORDS_PER_INSTITUTION", 24)
    monkeypatch.setattr(defaults, "TEST_RECORDS_PER_DOMAIN", 6)
    monkeypatch.setattr(defaults, "BATCH_SIZE", 8)
    monkeypatch.setattr(defaults, "MODEL", SMALL)


@pytest.mark.usefixtures("tiny_defaults")
def test_simulate_writes_a_run_directory_that_passes_the_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "2", "--local-steps", "2"]
    assert main([*argv, "--lr", "0.02", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "round 1/2" in printed and "round 2/2" in printed and "secure-vs-plain" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert set(r) >= METRIC_FIELDS
        assert len(r["contributors"]) == 3
        assert set(r["eval_loss"]) == {"cardiology", "paediatrics", "retail banking", "fraud"}
        assert r["secure_vs_plain_max_abs_diff"] <= r["quantization_bound"]
    assert records[1]["eval_loss_mean"] < records[0]["eval_loss_mean"]
    run = json.loads((out / "run.json").read_text())
    assert run["secagg"]["ring_bits"] == 32 and run["secagg"]["threshold"] == 2
    assert run["dp"] is None
    tensors, config = load_adapter(out / "adapters" / "round_0001")
    assert any(".lora_A." in k for k in tensors) and any(".lora_B." in k for k in tensors)
    assert config.r == defaults.LORA_RANK
    assert (out / "loss.png").is_file()
    assert "within the bound" in (out / "report.md").read_text()
    assert (out / "transcripts" / "round_0001.json").is_file()
    assert main(["audit", str(out)]) == 0


@pytest.mark.usefixtures("tiny_defaults")
def test_simulate_with_dp_says_which_epsilon_it_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "1", "--local-steps", "1"]
    assert main([*argv, "--dp-epsilon", "8", "--out", str(out), "--quiet"]) == 0
    banner = capsys.readouterr().out
    assert "against the server (zero-out, client level; no amplification by sampling" in banner
    assert "in at most 1 released sums" in banner
    run = json.loads((out / "run.json").read_text())
    assert run["dp"]["threat_model"] == "server" and run["dp"]["adjacency"] == "zero-out"
    assert run["dp"]["participations"] == 1 and run["dp"]["epsilon"] <= 8
    assert "against the server (client level, zero-out adjacency" in (out / "report.md").read_text()
    assert main(["audit", str(out)]) == 0
    audit = capsys.readouterr().out
    assert "total epsilon against the server" in audit and "no amplification" in audit
    assert "| amplified by sampling |" in (out / "privacy.md").read_text()


@pytest.mark.usefixtures("tiny_defaults")
def test_simulate_with_a_local_model_and_jsonl_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    texts = []
    for i, name in enumerate(["north", "south", "east"]):
        records = [
            AlpacaRecord(f"What does clinic {name} open at on day {d}?", "", f"At {8 + i + d}.")
            for d in range(6)
        ]
        write_alpaca_jsonl(records, data / f"{name}.jsonl")
        texts += [r.instruction + r.output for r in records]
    model = tmp_path / "model"
    tokenizer = build_tokenizer(texts, vocab_size=300)
    save_base(build_tiny_llama(len(tokenizer), SMALL), tokenizer, model)
    out = tmp_path / "run"
    argv = ["simulate", "--rounds", "1", "--local-steps", "1", "--strategy", "fedprox"]
    argv += ["--lora-mode", "ffa", "--model", str(model), "--data", str(data)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    # Without a test/ folder each institution's last records are its eval set.
    assert set(record["eval_loss"]) == {"north", "south", "east"}
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == str(model) and run["lora_mode"] == "ffa"
    assert main(["audit", str(out)]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--institutions", "2"], "--institutions must be >= 3"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--dp-epsilon", "-1"], "--dp-epsilon must be a positive number"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a directory"),
        (["--data", "/nonexistent/data"], "--data /nonexistent/data: not a directory"),
    ],
)
def test_bad_flags_give_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["simulate", "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsec simulate: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_a_data_folder_with_one_institution_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_alpaca_jsonl([AlpacaRecord("q", "", "a")] * 3, tmp_path / "only.jsonl")
    argv = ["simulate", "--institutions", "3", "--data", str(tmp_path)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "need one <institution>.jsonl per institution" in capsys.readouterr().err


@pytest.mark.usefixtures("tiny_defaults")
def test_each_institution_walks_its_data_across_rounds() -> None:
    # 24 records in batches of 8: 3 batches per epoch. Two rounds of 2 local steps continue one
    # order (batches 0, 1 then 2, 3), so the first epoch is complete after round 2.
    fed, trainer = prepare(SimulationSpec(3, 2, 2))
    fed.run()
    assert trainer.batches_drawn == {name: 4 for name in fed.ids}

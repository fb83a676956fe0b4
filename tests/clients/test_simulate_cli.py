"""``fedsec simulate`` end to end on a tiny config (3 institutions, 2 rounds, 2 local steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import clients.defaults as defaults
from clients.data import AlpacaRecord, write_alpaca_jsonl
from clients.model_factory import TinyLlamaSpec, build_tiny_llama, build_tokenizer, save_base
from clients.simulation import prepare
from clients.workload import SimulationSpec
from fl_core.adapter_io import load_adapter
from fl_core.cli import main
from fl_core.federation import Federation
from fl_core.recipe import EMBEDDED

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


#: Small embedded data and batches: the flags every end-to-end run here adds.
TINY = ["--records", "24", "--eval-records", "6", "--batch-size", "8", "--generate", "2"]


@pytest.fixture()
def tiny_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "TEST_RECORDS_PER_DOMAIN", 6)
    monkeypatch.setattr(defaults, "MODEL", SMALL)


@pytest.mark.usefixtures("tiny_defaults")
def test_simulate_writes_a_run_directory_that_passes_the_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "2", "--local-steps", "2", *TINY]
    assert main([*argv, "--lr", "0.02", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "round 1/2" in printed and "round 2/2" in printed and "secure-vs-plain" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    institutions = {"cardiology-1", "paediatrics-1", "retail-banking-1"}
    for r in records:
        assert set(r) >= METRIC_FIELDS
        assert len(r["contributors"]) == 3
        # Each institution on its own held-out set, and the pooled loss beside them.
        assert set(r["eval_loss"]) == institutions
        assert min(r["eval_loss"].values()) <= r["eval_loss_pooled"] <= max(r["eval_loss"].values())
        assert r["secure_vs_plain_max_abs_diff"] <= r["quantization_bound"]
    assert records[1]["eval_loss_mean"] < records[0]["eval_loss_mean"]
    run = json.loads((out / "run.json").read_text())
    assert run["secagg"]["ring_bits"] == 32 and run["secagg"]["threshold"] == 2
    assert run["dp"] is None
    tensors, config = load_adapter(out / "adapters" / "round_0001")
    assert any(".lora_A." in k for k in tensors) and any(".lora_B." in k for k in tensors)
    assert config.r == defaults.LORA_RANK
    assert config.base_model_name_or_path == str((out / "base").resolve())
    assert (out / "loss.png").is_file()
    report = (out / "report.md").read_text()
    assert "within the bound" in report and "| **pooled** |" in report
    assert "LoRA adapted 8 modules" in report and "`lm_head` x1" in report
    assert (
        "## Generation on held-out questions" in report and "### Answers before and after" in report
    )
    generation = json.loads((out / "generation.json").read_text())
    assert set(generation["after"]) == institutions and len(generation["samples"]) == 6
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
    argv += ["--lora-mode", "ffa", "--model", str(model), "--data", str(data), "--generate", "1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    # Without a test/ folder each institution's last records are its eval set.
    assert set(record["eval_loss"]) == {"north", "south", "east"}
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == str(model) and run["lora_mode"] == "ffa"
    # A local directory is a pretrained base: its defaults, not the embedded model's.
    assert run["recipe"]["lr"] == 1e-3 and run["base_model"]["path"] == str(model.resolve())
    _, adapter = load_adapter(out / "adapters" / "round_0000")
    assert adapter.base_model_name_or_path == str(model.resolve())
    assert not (out / "base").exists()
    assert main(["audit", str(out)]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--institutions", "2"], "--institutions must be >= 3"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--dp-epsilon", "-1"], "--dp-epsilon must be a positive number"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a directory"),
        (["--data", "/nonexistent/data"], "--data /nonexistent/data: not a directory"),
        (["--lora-rank", "0"], "--lora-rank: lora_rank must be >= 1"),
        (["--strategy", "scaffold", "--optimizer", "adamw"], "SCAFFOLD's control variates"),
        (["--partition", "dirichlet"], "--partition dirichlet: partition dirichlet needs a field"),
        (["--partition-field", "x"], "--partition-field and --dirichlet-alpha go with"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "cuda"),
        (["--quantization", "4bit", "--device", "cpu"], "needs a CUDA GPU"),
        (
            ["--resume", "/nonexistent/run"],
            "--resume continues a run with its own settings; drop --out",
        ),
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
    assert "need one data file per institution" in capsys.readouterr().err


RECIPE = EMBEDDED.with_overrides({"local_steps": 2, "batch_size": 8})


@pytest.mark.usefixtures("tiny_defaults")
def test_each_institution_walks_its_data_across_rounds() -> None:
    # 24 records in batches of 8: 3 batches per epoch. Two rounds of 2 local steps continue one
    # order (batches 0, 1 then 2, 3), so the first epoch is complete after round 2.
    fed, trainer = prepare(SimulationSpec(3, 2, RECIPE, records=24, eval_records=6))
    fed.run()
    assert trainer.batches_drawn == {name: 4 for name in fed.ids}


@pytest.mark.usefixtures("tiny_defaults")
def test_the_run_directory_alone_gives_the_adapted_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "1", "--local-steps", "2", *TINY]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    adapter = out / "adapters" / "round_0000"
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, adapter)
    # The same logits as the simulation's own model with the final global vector.
    _, trainer = prepare(SimulationSpec(3, 1, RECIPE, records=24, eval_records=6, generate=2))
    ids = torch.tensor([tokenizer.encode("Which cardiac condition is warfarin prescribed for?")])
    tensors, _ = load_adapter(adapter)
    trainer.work.lm.set_tensors(tensors)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.work.lm.model(ids).logits)
    # And AutoPeftModel finds the base from the adapter config alone.
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.usefixtures("tiny_defaults")
def test_resume_continues_where_an_interrupted_run_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--institutions", "3", "--rounds", "3", "--local-steps", "2", *TINY]
    argv += ["--strategy", "fedadam", "--quiet"]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0
    cut = tmp_path / "cut"
    calls = {"n": 0}
    real = Federation.run_round

    def stop_in_round_three(self: Federation, r: int, dropouts: tuple[str, ...] = ()) -> object:
        calls["n"] += 1
        if r == 2:
            raise KeyboardInterrupt
        return real(self, r, dropouts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Federation, "run_round", stop_in_round_three)
        assert main([*argv, "--out", str(cut)]) == 130
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["simulate", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a run directory with recorded rounds" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(cut), "--rounds", "5"]) == 2
    assert "--resume continues a run with its own settings; drop --rounds" in (
        capsys.readouterr().err
    )
    assert main(["simulate", "--resume", str(cut), "--quiet"]) == 0
    assert "resuming after round 2 of 3" in capsys.readouterr().out
    a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in b] == [0, 1, 2]
    # The same rounds: FedAdam's server state, the clients' data positions and the global
    # vector carried over (the secure sums' stochastic rounding differs by ~1e-9 per round).
    for x, y in zip(a, b, strict=True):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-3)
    assert "report.md" in {p.name for p in cut.iterdir()}


def test_tensorboard_without_the_package_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    argv = ["simulate", "--institutions", "3", "--rounds", "1", "--local-steps", "1", *TINY]
    assert main([*argv, "--tensorboard", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install 'fedsec[tensorboard]'") and "\n" not in err


@pytest.mark.usefixtures("tiny_defaults")
def test_dp_guidance_warns_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--institutions", "3", "--rounds", "1", "--local-steps", "1", *TINY]
    assert main([*argv, "--dp-epsilon", "8", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    warning = next(line for line in printed.splitlines() if "WARNING: DP noise" in line)
    assert printed.index(warning) < printed.index("round 1/1")
    n = int(warning.split("at a cohort of ")[1].split()[0])
    assert n > 3
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dp_guidance"]["cohort_for_ratio_one"] == n and run["dp_guidance"]["warning"]
    assert "WARNING: DP noise" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.usefixtures("tiny_defaults")
def test_one_file_split_into_institutions(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"Q{i} about {topic}?", "context": "", "response": f"A{i}.",
         "category": topic}
        for i in range(30) for topic in ("qa", "summary", "brainstorm")
    ]  # fmt: skip
    data = tmp_path / "dolly.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    argv = ["simulate", "--rounds", "1", "--local-steps", "1", "--batch-size", "4"]
    argv += ["--data", str(data), "--partition", "field", "--partition-field", "category"]
    assert main([*argv, "--generate", "0", "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["samples"] == {"brainstorm": 27, "qa": 27, "summary": 27}
    assert run["eval_sets"] == {"brainstorm": 3, "qa": 3, "summary": 3}
    assert "split field by category" in run["data"]


@pytest.mark.usefixtures("tiny_defaults")
def test_tensorboard_scalars_per_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["simulate", "--institutions", "3", "--rounds", "2", "--local-steps", "1", *TINY]
    assert main([*argv, "--tensorboard", "--out", str(out), "--quiet"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "eval_loss/pooled", "eval_loss/cardiology-1"} <= tags
    assert [e.step for e in events.Scalars("eval_loss/pooled")] == [1, 2]

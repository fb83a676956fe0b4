"""The aggregation backend chosen by configuration: CKKS against masking on a numpy workload.

Client c moves halfway to its own target vector, so each round's plaintext FedAvg is known in
closed form and both backends' released aggregates can be checked against it and each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

import clients.defaults as defaults
from clients.model_factory import TinyLlamaSpec
from fl_core.adapter_io import AdapterConfig
from fl_core.aggregation import CkksBackend, CkksRoundRecord, ckks_params
from fl_core.cli import main
from fl_core.federation import (
    ClientUpdate,
    DpSettings,
    Federation,
    FederationConfig,
    FederationConfigError,
    RoundOutcome,
    SecAggSettings,
)
from fl_core.run_dir import RunWriter
from fl_core.strategies import ClientOptions
from secagg.errors import TooFewSurvivors
from secagg.he import NoDecryptor
from secagg.transcript import Transcript

DIM = 64
NAMES = ("alpha", "bravo", "charlie", "delta")


class TargetTrainer:
    def __init__(self) -> None:
        self.targets = {
            n: np.random.default_rng(i).normal(0, 0.05, DIM).astype(np.float32)
            for i, n in enumerate(NAMES)
        }
        self.samples = {n: 10 + 7 * i for i, n in enumerate(NAMES)}

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        delta = (0.5 * (self.targets[client] - global_vector)).astype(np.float32)
        return ClientUpdate(delta, self.samples[client], float(np.sum(delta**2)))

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return {n: float(np.sum((t - vector) ** 2)) for n, t in self.targets.items()}

    def fedavg(self, vector: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        """The plaintext sample-weighted FedAvg step over ``names`` from ``vector``."""
        g = vector.astype(np.float64)
        w = np.array([self.samples[n] for n in names], dtype=np.float64)
        deltas = np.stack([0.5 * (self.targets[n] - g) for n in names])
        return np.asarray(g + (w[:, None] * deltas).sum(0) / w.sum())


def federation(backend: str, rounds: int = 2) -> tuple[Federation, TargetTrainer]:
    trainer = TargetTrainer()
    config = FederationConfig(NAMES, rounds, SecAggSettings(clip=0.2), seed=3, backend=backend)
    fed = Federation(
        config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), max(trainer.samples.values())
    )
    return fed, trainer


def test_ckks_gives_the_masking_global_vector_within_the_stated_bounds() -> None:
    runs = {b: federation(b) for b in ("masking", "ckks")}
    slack = 0.0
    sessions = set()
    for r in range(2):
        outcomes = {}
        for backend, (fed, trainer) in runs.items():
            before = fed.global_vector.copy()
            outcome = fed.run_round(r)
            m = outcome.metrics
            assert m.backend == backend and m.to_json()["backend"] == backend
            assert m.contributors == NAMES
            assert 0 < m.secure_vs_plain_max_abs_diff <= m.quantization_bound < 1e-6
            # The global step is the released mean: within the bound of plaintext FedAvg.
            expected = trainer.fedavg(before, NAMES)
            assert np.max(np.abs(outcome.global_vector - expected)) <= m.quantization_bound + 1e-7
            outcomes[backend] = outcome
            slack += m.quantization_bound + 1e-7
        ckks = outcomes["ckks"]
        gap = np.max(np.abs(ckks.global_vector - outcomes["masking"].global_vector))
        assert gap <= slack
        assert isinstance(ckks.transcript, CkksRoundRecord)
        assert isinstance(outcomes["masking"].transcript, Transcript)
        record = ckks.transcript
        assert record.session_id.hex() == ckks.metrics.session_id
        sessions.add(record.session_id)
        assert record.contributors == (1, 2, 3, 4) and record.decryptor == 1
        assert [u.sender for u in record.uploads] == [1, 2, 3, 4]
        m = ckks.metrics
        assert m.threshold == record.threshold == 3 and m.neighbours is None
        assert set(m.stage_s) == {"encrypt", "aggregate", "decrypt"}
        assert 0 < m.client_mask_s < m.aggregation_s
        # One CKKS ciphertext (4096 slots) per upload: far more than the 4 bytes/coordinate.
        assert m.upload_bytes["per_client_mean"] == record.uploads[0].size > 100 * DIM
    assert len(sessions) == 2


@pytest.mark.parametrize("backend", ["masking", "ckks"])
def test_a_client_that_drops_does_not_stop_the_round(backend: str) -> None:
    fed, trainer = federation(backend)
    outcome = fed.run_round(0, dropouts=("delta",))
    m = outcome.metrics
    survivors = ("alpha", "bravo", "charlie")
    assert m.cohort == NAMES and m.contributors == survivors
    expected = trainer.fedavg(np.zeros(DIM, np.float32), survivors)
    assert np.max(np.abs(outcome.global_vector - expected)) <= m.quantization_bound + 1e-7
    assert m.secure_vs_plain_max_abs_diff <= m.quantization_bound
    if backend == "ckks":
        assert isinstance(outcome.transcript, CkksRoundRecord)
        assert outcome.transcript.decryptor == 1  # the lowest id of the cohort decrypts
        assert m.upload_bytes["total"] == 3 * m.upload_bytes["per_client_mean"]
    # Below the threshold (3 of 4) nothing is released and the global vector does not move.
    before = fed.global_vector.copy()
    with pytest.raises(TooFewSurvivors):
        fed.run_round(1, dropouts=("alpha", "bravo"))
    np.testing.assert_array_equal(fed.global_vector, before)
    with pytest.raises(FederationConfigError, match="unknown institutions"):
        fed.run_round(1, dropouts=("zulu",))


def test_a_ckks_round_whose_decryptor_drops_releases_nothing() -> None:
    """The decryptor is fixed before the uploads (the lowest cohort id, bound into every
    contributor's pads); if it is lost the round ends with nothing released, as no other client
    may open this session's aggregate."""
    fed, _ = federation("ckks")
    before = fed.global_vector.copy()
    with pytest.raises(NoDecryptor, match="client 1, did not upload"):
        fed.run_round(0, dropouts=("alpha",))
    np.testing.assert_array_equal(fed.global_vector, before)


def test_the_server_side_holds_no_secret_key() -> None:
    fed, _ = federation("ckks")
    assert isinstance(fed.backend, CkksBackend)
    server = fed.backend.server_context
    assert not server.context.is_private()
    assert not hasattr(server, "secret")
    assert not ts.context_from(server.to_bytes()).is_private()
    assert fed.backend._secrets[1].tag_key not in server.to_bytes()
    run = fed.describe()
    assert run["backend"] == "ckks" and "secagg" not in run and run["dp"] is None
    assert run["ckks"]["security_bits"] >= 128 and run["ckks"]["poly_modulus_degree"] == 8192
    assert "colluding" in run["ckks"]["trust_model"]
    assert run["ckks"]["fingerprint"] == server.fingerprint.hex()


def test_ckks_scale_shrinks_to_hold_large_weights() -> None:
    assert ckks_params(0.2, 4, 31, 3).scale_bits == 40
    large = ckks_params(1.0, 100, 10**6, 6)  # worst-case sum ~1e8: needs 27 bits of headroom
    assert large.scale_bits < 40 and large.security_bits >= 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "paillier"}, "unknown aggregation backend 'paillier'; choose one of "),
        (
            {"backend": "ckks", "dp": DpSettings(epsilon=4.0, clip=0.1)},
            "distributed DP needs the masking backend",
        ),
    ],
)
def test_unknown_backend_and_dp_with_ckks_are_refused(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(FederationConfigError, match=match) as info:
        FederationConfig(NAMES, 1, SecAggSettings(clip=1.0), **kwargs)  # type: ignore[arg-type]
    if kwargs["backend"] == "paillier":
        assert "masking, ckks" in str(info.value)


def _write_run(fed: Federation, trainer: TargetTrainer, out: Path) -> None:
    writer = RunWriter(out, fed.describe())
    names = sorted(f"m.layers.0.q_proj.lora_{ab}.weight" for ab in "AB")
    config = AdapterConfig(r=4, lora_alpha=8, target_modules=("q_proj",))

    def on_round(outcome: RoundOutcome) -> None:
        half = outcome.global_vector.reshape(2, DIM // 2)
        writer.record_round(outcome, dict(zip(names, half, strict=True)), config)

    initial = trainer.evaluate(fed.global_vector)
    fed.run(on_round)
    writer.finish(initial, wall_s=1.0)


def test_audit_of_a_ckks_run_applies_what_still_makes_sense(tmp_path: Path) -> None:
    fed, trainer = federation("ckks")
    out = tmp_path / "run"
    _write_run(fed, trainer, out)
    report = (out / "report.md").read_text()
    assert "Aggregation backend: `ckks`" in report and "within the bound" in report
    assert main(["audit", str(out)]) == 0
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["passed"] and privacy["backend"] == "ckks"
    status = {c["name"]: c["status"] for c in privacy["checks"]}
    assert status == {
        "share_separation": "not applicable",
        "release_threshold": "passed",
        "session_isolation": "passed",
        "record_integrity": "not applicable",
        "graph_seed": "not applicable",
        "active_server_parameters": "not applicable",
        "masked_input_uniformity": "not applicable",
        "run_consistency": "passed",
        "dp_accounting": "not tested",
    }
    assert privacy["fewest_contributors"] == 4
    assert privacy["cryptography"]["backend"] == "ckks"
    markdown = (out / "privacy.md").read_text()
    assert "## Aggregation backend" in markdown and "**NOT APPLICABLE**" in markdown

    # A server record that releases fewer than min_contributors fails the audit, named.
    path = out / "transcripts" / "round_0001.json"
    record = json.loads(path.read_text())
    record["contributors"] = record["contributors"][:2]
    path.write_text(json.dumps(record))
    assert main(["audit", str(out)]) == 1
    privacy = json.loads((out / "privacy.json").read_text())
    failed = {c["name"]: c["reasons"] for c in privacy["checks"] if c["status"] == "failed"}
    assert set(failed) == {"release_threshold", "run_consistency"}
    assert "round 1" in failed["release_threshold"][0]
    assert "threshold t = 3" in failed["release_threshold"][0]

    # A release opened by another client than the round's one decryptor fails it too.
    record = json.loads((out / "transcripts" / "round_0000.json").read_text())
    record["decryptor"] = 2
    (out / "transcripts" / "round_0000.json").write_text(json.dumps(record))
    assert main(["audit", str(out)]) == 1
    privacy = json.loads((out / "privacy.json").read_text())
    failed = {c["name"]: c["reasons"] for c in privacy["checks"] if c["status"] == "failed"}
    assert any("the round's decryptor is the lowest" in r for r in failed["release_threshold"])


def test_a_masking_run_audit_names_no_backend(tmp_path: Path) -> None:
    fed, trainer = federation("masking", rounds=1)
    out = tmp_path / "run"
    _write_run(fed, trainer, out)
    assert main(["audit", str(out)]) == 0
    privacy = json.loads((out / "privacy.json").read_text())
    assert "backend" not in privacy
    assert privacy["checks"][0] == {
        "name": "share_separation",
        "description": "no client had both its self-mask share and its key share requested",
        "status": "passed",
        "reasons": [],
        "note": "",
    }
    assert "Aggregation backend" not in (out / "privacy.md").read_text()


@pytest.fixture()
def tiny_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "RECORDS_PER_INSTITUTION", 24)
    monkeypatch.setattr(defaults, "TEST_RECORDS_PER_DOMAIN", 6)
    monkeypatch.setattr(defaults, "BATCH_SIZE", 8)
    monkeypatch.setattr(
        defaults,
        "MODEL",
        TinyLlamaSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    )


@pytest.mark.usefixtures("tiny_defaults")
def test_fedsec_simulate_backend_ckks_writes_a_run_the_audit_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--backend", "ckks", "--institutions", "3", "--rounds", "1"]
    assert main([*argv, "--local-steps", "1", "--out", str(out), "--quiet"]) == 0
    assert "ckks (N=8192" in capsys.readouterr().out
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["backend"] == "ckks" and len(record["contributors"]) == 3
    assert record["secure_vs_plain_max_abs_diff"] <= record["quantization_bound"]
    assert json.loads((out / "run.json").read_text())["ckks"]["min_contributors"] == 2
    assert "Aggregation backend: `ckks`" in (out / "report.md").read_text()
    assert main(["audit", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "backend ckks" in printed and "all checks passed" in printed
    assert "ckks" in (out / "privacy.md").read_text()


def test_fedsec_simulate_refuses_dp_with_ckks_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--backend", "ckks", "--dp-epsilon", "4", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsec simulate: error: --backend ckks: distributed DP needs")
    assert "\n" not in err and not (tmp_path / "r").exists()

"""The in-process federation on a numpy workload (no torch): secure sums, strategies, run dirs.

Each client "trains" by moving halfway towards its own target vector, so the plaintext FedAvg
of a round is known in closed form and the secure aggregate can be checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_core.adapter_io import AdapterConfig, load_adapter
from fl_core.cli import main
from fl_core.federation import (
    ClientUpdate,
    DpSettings,
    Federation,
    FederationConfig,
    FederationConfigError,
    PrivacyBudgetExhausted,
    SecAggSettings,
    choose_graph,
)
from fl_core.run_dir import RunDirectoryError, RunWriter
from fl_core.strategies import ClientOptions
from proofs.accountant import RdpAccountant, SkellamDpEvent, epsilon_for_rounds
from secagg.dp.events import DpEvent
from secagg.errors import TooFewSurvivors
from secagg.params import SECAGGPLUS_MIN_COHORT, SessionShape

DIM = 64
NAMES = ("alpha", "bravo", "charlie", "delta")


class TargetTrainer:
    """Client c moves halfway to target_c; SCAFFOLD clients also report a control delta."""

    def __init__(self, names: tuple[str, ...] = NAMES) -> None:
        self.targets = {
            n: np.random.default_rng(i).normal(0, 0.05, DIM).astype(np.float32)
            for i, n in enumerate(names)
        }
        self.samples = {n: 10 + 7 * i for i, n in enumerate(names)}
        self.seen: list[tuple[str, int, ClientOptions]] = []

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        self.seen.append((client, round_index, options))
        delta = (0.5 * (self.targets[client] - global_vector)).astype(np.float32)
        control = None if options.server_control is None else (-delta).astype(np.float32)
        loss = float(np.sum((self.targets[client] - global_vector) ** 2))
        return ClientUpdate(delta, self.samples[client], loss, control)

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return {n: float(np.sum((t - vector) ** 2)) for n, t in self.targets.items()}


def federation(
    strategy: str = "fedavg",
    rounds: int = 3,
    dp: DpSettings | None = None,
    secagg: SecAggSettings | None = None,
) -> tuple[Federation, TargetTrainer]:
    trainer = TargetTrainer()
    settings = SecAggSettings(clip=0.2) if secagg is None else secagg
    config = FederationConfig(NAMES, rounds, settings, strategy=strategy, dp=dp, seed=3)
    fed = Federation(
        config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), max(trainer.samples.values())
    )
    return fed, trainer


def test_each_round_matches_plaintext_fedavg_within_the_stated_bound() -> None:
    fed, trainer = federation()
    g = np.zeros(DIM)
    for r in range(3):
        outcome = fed.run_round(r)
        m = outcome.metrics
        w = np.array([trainer.samples[n] for n in NAMES], dtype=np.float64)
        deltas = np.stack([0.5 * (trainer.targets[n] - g) for n in NAMES])
        expected = g + (w[:, None] * deltas).sum(0) / w.sum()
        assert 0 < m.quantization_bound < 1e-6
        assert m.secure_vs_plain_max_abs_diff <= m.quantization_bound
        # The global step is the secure mean, so it inherits the bound (plus float32 storage).
        err = np.max(np.abs(outcome.global_vector - expected))
        assert err <= m.quantization_bound + 1e-7
        assert m.contributors == m.cohort == NAMES
        assert 0 < m.client_mask_s < m.aggregation_s
        assert m.upload_bytes["total"] == pytest.approx(4 * m.upload_bytes["per_client_mean"])
        assert m.upload_bytes["per_client_mean"] > 4 * DIM  # the masked vector at least
        g = outcome.global_vector.astype(np.float64)
    # Moving towards the weighted mean of the targets lowers the mean eval loss.
    assert m.eval_loss_mean < sum(trainer.evaluate(np.zeros(DIM, np.float32)).values()) / 4


def test_sessions_are_fresh_and_clients_sign_the_global_model() -> None:
    fed, _ = federation(rounds=2)
    first, second = fed.run_round(0), fed.run_round(1)
    assert first.metrics.session_id != second.metrics.session_id
    assert first.transcript.session_id.hex() == first.metrics.session_id
    assert first.transcript.threshold == first.metrics.threshold == 3
    assert first.transcript.neighbours is None  # small cohort: complete graph


def test_clipping_is_reported_and_the_check_uses_the_clipped_vectors() -> None:
    trainer = TargetTrainer()
    trainer.targets["alpha"] = np.full(DIM, 5.0, dtype=np.float32)  # delta 2.5 > clip 0.2
    config = FederationConfig(NAMES, 1, SecAggSettings(clip=0.2))
    fed = Federation(config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), 40)
    m = fed.run_round(0).metrics
    assert m.clip_fraction >= 0.25
    assert m.secure_vs_plain_max_abs_diff <= m.quantization_bound


def test_scaffold_sums_update_and_control_variate_securely() -> None:
    fed, trainer = federation("scaffold", rounds=2)
    fed.run_round(0)
    # Every client sent -delta as control delta, so c = (4/4) * mean(-delta) after round 0.
    options = fed.strategy.client_options()
    assert options.server_control is not None
    assert np.all(np.abs(options.server_control) > 0)
    fed.run_round(1)
    round1 = [o for _, r, o in trainer.seen if r == 1]
    assert all(o.server_control is not None for o in round1)


def test_dp_round_records_what_the_accountant_needs() -> None:
    fed, _ = federation(rounds=2, dp=DP)
    m = fed.run_round(0).metrics
    record = m.to_json()
    assert record["mechanism"] == "skellam"
    assert "sampling_rate" not in record and record["delta"] == 1e-5
    event = DpEvent.from_dict(record["dp_event"])  # what calibration emitted, read back
    assert isinstance(event, SkellamDpEvent) and event.variance > 0
    assert record["noise_multiplier"] > 0
    # Secure aggregation adds the noised ring vectors exactly.
    assert m.secure_vs_plain_max_abs_diff == 0.0 and m.quantization_bound == 0.0


DP = DpSettings(epsilon=8.0, delta=1e-5, clip=0.1)


def test_issue_example_amplification_by_public_cohorts_understated_epsilon_threefold() -> None:
    # 100 institutions, cohorts of 10 from the public seed, 100 rounds, target epsilon 4.
    names = tuple(f"inst-{i:03d}" for i in range(100))
    config = FederationConfig(
        names, 100, SecAggSettings(clip=0.2), cohort_size=10, dp=DpSettings(4.0), seed=0
    )
    # Expected 10 rounds each, but with seed 0 the busiest institution is in 20 cohorts, and
    # the server (anyone who knows the seed) knows which.
    assert config.participations() == 20
    trainer = TargetTrainer(names)
    fed = Federation(config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), 1)
    cal = fed.calibration
    assert cal is not None and cal.participations == 20
    p, n = cal.params, cal.min_contributors

    def release(stddev: float) -> SkellamDpEvent:
        return SkellamDpEvent(p.l2_sensitivity, p.l1_sensitivity, n * stddev**2)

    # Before: the noise was sized so that 100 rounds Poisson-subsampled at q = 10/100 spend 4.
    lo, hi = 1.0, p.noise.stddev
    while hi / lo > 1 + 1e-9:
        mid = (lo * hi) ** 0.5
        lo, hi = (
            (lo, mid) if epsilon_for_rounds(release(mid), 0.1, 100, 1e-5)[0] <= 4 else (mid, hi)
        )
    reported, _ = epsilon_for_rounds(release(hi), 0.1, 100, 1e-5)
    actual = RdpAccountant().compose(release(hi), 20).get_epsilon(1e-5)
    assert reported == pytest.approx(4.0, abs=1e-6)
    assert actual == pytest.approx(12.5, abs=0.1)  # the issue's figure
    # After: calibrated so that the busiest institution's 20 releases, at full rate, spend 4.
    against_server = RdpAccountant().compose(release(p.noise.stddev), 20).get_epsilon(1e-5)
    assert against_server <= cal.epsilon <= 4.0
    # The honest cost: about 2.6 times the noise the amplified figure relied on.
    assert p.noise.stddev / hi == pytest.approx(2.63, abs=0.02)
    assert fed.describe()["sampling"]["rounds_per_institution_max"] == 20


def test_an_institution_is_never_in_more_releases_than_calibrated() -> None:
    names = tuple(f"inst-{i}" for i in range(12))
    trainer = TargetTrainer(names)
    config = FederationConfig(names, 6, SecAggSettings(clip=0.2), cohort_size=4, dp=DP, seed=5)
    fed = Federation(config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), 1)
    assert fed.calibration is not None
    most = fed.calibration.participations
    assert most == config.participations() == 3  # cohorts of 4 of 12: 3 of the 6 rounds at most
    fed.run()
    assert max(fed.contributions.values()) == most
    # A server replaying a round whose cohort holds an institution at its count is refused
    # before anyone trains; nothing changes.
    busy = next(
        r for r, c in enumerate(config.schedule()) if any(fed.contributions[n] == most for n in c)
    )
    before, trained = fed.global_vector.copy(), len(trainer.seen)
    with pytest.raises(PrivacyBudgetExhausted, match=f"already in {most} released sums"):
        fed.run_round(busy)
    assert len(trainer.seen) == trained
    np.testing.assert_array_equal(fed.global_vector, before)


def test_dp_noise_is_calibrated_for_the_enforced_floor_not_the_secaggplus_threshold() -> None:
    names = tuple(f"inst-{i:03d}" for i in range(128))
    trainer = TargetTrainer(names)

    def build(dp: DpSettings | None) -> Federation:
        config = FederationConfig(names, 1, SecAggSettings(clip=0.2), dp=dp)
        return Federation(config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), 1)

    plain, noised = build(None), build(DP)
    # SecAgg+ against an active server: (k, t) = (20, 14) per neighbourhood, and a survivor set
    # must be signed by floor((128 + 6)/2) + 1 = 68 clients, so no release has fewer.
    assert plain.graph == noised.graph == SessionShape(14, 20, 68)
    assert plain.min_release == 68 and plain.describe()["secagg"]["min_release"] == 68
    # 5% of 128 drop at most (7 rounded up): the noise is sized for 121 contributors, and that
    # is the floor every session enforces and what run.json reports.
    assert noised.calibration is not None
    assert noised.min_release == noised.calibration.min_contributors == 121
    run = noised.describe()
    assert run["dp"]["min_contributors"] == run["secagg"]["min_release"] == 121


def test_dp_round_tolerates_the_configured_dropouts_and_no_more() -> None:
    fed, _ = federation(rounds=2, dp=DP)
    assert fed.min_release == 3  # 4 institutions, 5% dropouts: one tolerated, as without DP
    m = fed.run_round(0, dropouts=("alpha",)).metrics
    assert m.contributors == ("bravo", "charlie", "delta") and m.min_release == 3
    before = fed.global_vector.copy()
    with pytest.raises(TooFewSurvivors):
        fed.run_round(1, dropouts=("alpha", "bravo"))
    np.testing.assert_array_equal(fed.global_vector, before)


def test_dp_round_below_its_calibrated_floor_aborts_where_plain_secagg_goes_on() -> None:
    none_tolerated = SecAggSettings(clip=0.2, dropout_fraction=0.0)
    plain, _ = federation(rounds=1, secagg=none_tolerated)
    assert plain.run_round(0, dropouts=("alpha",)).metrics.threshold == 3
    fed, _ = federation(rounds=1, dp=DP, secagg=none_tolerated)
    assert fed.calibration is not None and fed.calibration.min_contributors == 4
    before = fed.global_vector.copy()
    # 3 contributors meet t = 3 but not the 4 the noise was sized for: nothing is released.
    with pytest.raises(TooFewSurvivors, match="release floor is 4"):
        fed.run_round(0, dropouts=("alpha",))
    np.testing.assert_array_equal(fed.global_vector, before)


def test_audit_checks_the_dp_floor_against_what_each_session_enforced(tmp_path: Path) -> None:
    fed, trainer = federation(
        rounds=1, dp=DP, secagg=SecAggSettings(clip=0.2, dropout_fraction=0.0)
    )
    writer = RunWriter(tmp_path, fed.describe())
    names = sorted(f"m.layers.0.q_proj.lora_{ab}.weight" for ab in "AB")
    config = AdapterConfig(r=4, lora_alpha=8, target_modules=("q_proj",))
    outcome = fed.run_round(0)
    assert outcome.metrics.min_release == outcome.transcript.releases[0].threshold == 4
    writer.record_round(
        outcome, dict(zip(names, outcome.global_vector.reshape(2, -1), strict=True)), config
    )
    writer.finish(trainer.evaluate(np.zeros(DIM, np.float32)), wall_s=1.0)
    assert "at least 4 contributors per released sum" in (tmp_path / "report.md").read_text()
    assert main(["audit", str(tmp_path)]) == 0
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["cryptography"]["release_floor"] == [4]
    # A server that enforced only t = 3 in a run whose noise assumes 4 fails the audit.
    path = tmp_path / "transcripts" / "round_0000.json"
    record = json.loads(path.read_text())
    record["min_survivors"] = 0
    record["releases"][0]["threshold"] = 3
    path.write_text(json.dumps(record))
    assert main(["audit", str(tmp_path)]) == 1
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    failed = {c["name"]: c["reasons"] for c in privacy["checks"] if c["status"] == "failed"}
    assert set(failed) == {"run_consistency"}
    assert "calibrated for at least 4 contributors" in failed["run_consistency"][0]


def test_run_directory_passes_fedsec_audit(tmp_path: Path) -> None:
    for label, dp in (("plain", None), ("dp", DpSettings(epsilon=4.0, clip=0.1))):
        fed, trainer = federation(rounds=2, dp=dp)
        out = tmp_path / label
        writer = RunWriter(out, fed.describe())
        names = sorted(f"m.layers.0.q_proj.lora_{ab}.weight" for ab in "AB")
        config = AdapterConfig(r=4, lora_alpha=8, target_modules=("q_proj",))

        def on_round(outcome, writer=writer, names=names, config=config):  # type: ignore[no-untyped-def]
            half = outcome.global_vector.reshape(2, DIM // 2)
            writer.record_round(outcome, dict(zip(names, half, strict=True)), config)

        initial = trainer.evaluate(fed.global_vector)
        fed.run(on_round)
        writer.finish(initial, wall_s=1.0)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in lines] == [0, 1]
        assert (out / "loss.png").stat().st_size > 1000
        assert "within the bound" in (out / "report.md").read_text()
        tensors, _ = load_adapter(out / "adapters" / "round_0001")
        assert set(tensors) == set(names)
        assert main(["audit", str(out)]) == 0
        privacy = json.loads((out / "privacy.json").read_text())
        assert privacy["passed"]
        if dp is None:
            assert privacy["differential_privacy"]["epsilon_unbounded"]
        else:
            assert 0 < privacy["differential_privacy"]["epsilon_total"] <= 4.0
            figures = privacy["differential_privacy"]["figures"]
            assert figures[0]["name"] == "against the server" and figures[0]["applicable"]
            assert not figures[2]["applicable"]
            assert "every institution takes part in every round" in figures[2]["basis"]
            target = next(c for c in privacy["checks"] if c["name"] == "dp_target")
            assert target["status"] == "passed"
        with pytest.raises(RunDirectoryError, match="already holds a run"):
            RunWriter(out, {})


def test_large_cohorts_use_secaggplus_neighbourhoods() -> None:
    settings = SecAggSettings(clip=1.0)
    assert choose_graph(4, settings).neighbours is None
    large = choose_graph(100, settings)
    # DESIGN.md's semi-honest reference point is (12, 6); against an active server every
    # client demands the semi-malicious finder's degree and 2t > k + t1 + 1.
    assert (large.neighbours, large.threshold, large.quorum) == (18, 13, 53)
    names = tuple(f"inst-{i:02d}" for i in range(SECAGGPLUS_MIN_COHORT + 4))
    trainer = TargetTrainer(names)
    config = FederationConfig(names, 1, settings)
    fed = Federation(config, trainer, trainer.evaluate, np.zeros(DIM, np.float32), 200)
    outcome = fed.run_round(0)
    assert outcome.transcript.neighbours is not None
    assert outcome.transcript.neighbours < len(names) - 1
    assert len(outcome.metrics.contributors) == len(names)
    assert outcome.metrics.secure_vs_plain_max_abs_diff <= outcome.metrics.quantization_bound


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients": ("a", "b")}, "below the 3 clients"),
        ({"clients": ("a", "a", "b")}, "unique"),
        ({"rounds": 0}, "rounds must be"),
        ({"cohort_size": 5}, "from only 4"),
    ],
)
def test_bad_configurations_are_refused(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"clients": NAMES, "rounds": 1, "secagg": SecAggSettings(clip=1.0)}
    base.update(kwargs)
    with pytest.raises(FederationConfigError, match=match):
        FederationConfig(**base)  # type: ignore[arg-type]


def test_unreachable_dp_target_is_a_configuration_error() -> None:
    with pytest.raises(FederationConfigError, match="DP"):
        federation(dp=DpSettings(epsilon=1e-4, clip=0.1, ring_bits=16))

"""``fedsec audit``: the privacy report of a run directory, end to end through the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_core.cli import main
from proofs.accountant import GaussianDpEvent, epsilon_for_rounds
from secagg.dp.calibration import release_event, round_epsilon
from secagg.dp.encoder import DpParams
from secagg.dp.noise import NoiseSpec
from secagg.protocol import RoundParams, Stage
from secagg.ring import Ring
from secagg.simulate import simulate_round
from secagg.transcript import RejectionRecord, ShareRequestRecord, Transcript

COHORT = tuple(range(1, 7))
DIM = 1024
NOISE, RATE, DELTA = 1.1, 0.5, 1e-5


def write_run(
    directory: Path,
    rounds: int = 3,
    dp: dict[str, Any] | None = None,
    dropped_in: int = 1,
    cohorts: Sequence[tuple[int, ...]] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A run directory as 'fedsec simulate' writes it, from real secure-aggregation sessions
    (``cohorts``: one per round, default COHORT every round)."""
    ring = Ring(32)
    (directory / "transcripts").mkdir(parents=True)
    run = {"secagg": {"ring_bits": 32, "threshold": 4}, "dp": dp, **(config or {})}
    (directory / "run.json").write_text(json.dumps(run))
    lines = []
    for rnd in range(rounds):
        cohort = COHORT if cohorts is None else cohorts[rnd]
        params = RoundParams(os.urandom(32), ring.bits, DIM, 4, cohort)
        inputs = {u: ring.from_signed(np.full(DIM, u - 3, dtype=np.int64)) for u in cohort}
        dropouts = {Stage.MASKED_INPUT: [6]} if rnd == dropped_in else None
        result = simulate_round(params, inputs, dropouts=dropouts)
        path = directory / "transcripts" / f"round_{rnd:04d}.json"
        path.write_text(json.dumps(result.transcript.to_dict()))
        contributors = list(result.transcript.releases[0].contributors)
        record: dict[str, Any] = {
            "round": rnd,
            "cohort": list(cohort),
            "contributors": contributors,
            "clip_fraction": 0.25,
        }
        if dp is not None:
            record.update(dp)
        lines.append(json.dumps(record))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def gaussian() -> dict[str, Any]:
    return {
        "mechanism": "gaussian",
        "noise_multiplier": NOISE,
        # Written by earlier versions, which amplified by it; the server knows the cohorts, so
        # the audit must ignore it.
        "sampling_rate": RATE,
        "delta": DELTA,
    }


def read_report(directory: Path) -> tuple[dict[str, Any], str]:
    report = json.loads((directory / "privacy.json").read_text())
    return report, (directory / "privacy.md").read_text()


def test_dp_run_reports_epsilon_per_round_and_in_total(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", dp=gaussian())
    assert main(["audit", str(run_dir)]) == 0
    report, markdown = read_report(run_dir)
    assert report["passed"]
    dp = report["differential_privacy"]
    # Clients 1-5 are in all three releases, each at full rate: no amplification by RATE.
    expected, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), 1.0, 3, DELTA)
    amplified, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), RATE, 3, DELTA)
    assert expected > 1.4 * amplified
    assert dp["enabled"] and dp["delta"] == DELTA
    assert dp["epsilon_total"] == pytest.approx(expected, rel=1e-9)
    assert dp["most_releases_per_institution"] == 3
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    cumulative = [r["epsilon_cumulative"] for r in rounds]
    assert cumulative == sorted(cumulative) and cumulative[-1] == dp["epsilon_total"]
    single, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), 1.0, 1, DELTA)
    assert rounds[0]["epsilon_round"] == pytest.approx(single, rel=1e-9)
    assert rounds[0]["epsilon_cumulative"] == pytest.approx(single, rel=1e-9)
    # The dropout in round 1 is the smallest released aggregate.
    assert [r["contributors"] for r in rounds] == [6, 5, 6]
    assert report["fewest_contributors"] == 5
    assert report["cryptography"]["threshold"] == [4]
    assert report["cryptography"]["neighbourhood_degree"] == ["complete graph"]
    assert report["cryptography"]["ring_bits"] == [32]
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        "share_separation": "passed",
        "release_threshold": "passed",
        "session_isolation": "passed",
        "record_integrity": "passed",
        "graph_seed": "not applicable",
        "active_server_parameters": "passed",
        "masked_input_uniformity": "passed",
        "run_consistency": "passed",
        "dp_accounting": "passed",
        "dp_target": "not tested",  # the fixture's records carry no epsilon_target
    }
    assert "**Verdict: ALL CHECKS PASSED.**" in markdown
    assert "The server refused no message." in markdown
    assert "| 1 | 6 | 5 | 0.250 | gaussian |" in markdown
    assert f"{expected:.4g}" in markdown


def test_run_without_dp_states_unbounded_epsilon(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", rounds=2)
    assert main(["audit", str(run_dir)]) == 0
    report, markdown = read_report(run_dir)
    dp = report["differential_privacy"]
    assert not dp["enabled"]
    assert dp["epsilon_total"] is None and dp["epsilon_unbounded"]
    assert "Differential privacy was OFF" in dp["statement"]
    assert "Total ε against the server: **∞**" in markdown
    assert all(r["epsilon_round"] is None for r in report["rounds"])


def test_a_double_share_request_fails_the_audit_with_the_round_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(tmp_path / "run", dp=gaussian())
    path = run_dir / "transcripts" / "round_0002.json"
    transcript = Transcript.from_dict(json.loads(path.read_text()))
    transcript.share_requests.append(ShareRequestRecord(transcript.session_id, 1, (), (3,)))
    path.write_text(json.dumps(transcript.to_dict()))
    assert main(["audit", str(run_dir)]) == 1
    assert "FAILED: share_separation" in capsys.readouterr().out
    report, markdown = read_report(run_dir)
    assert not report["passed"]
    check = next(c for c in report["checks"] if c["name"] == "share_separation")
    assert check["status"] == "failed"
    assert check["reasons"][0].startswith("round 2: client 3:")
    assert "**Verdict: ONE OR MORE CHECKS FAILED.**" in markdown
    assert "| share_separation |" in markdown and "**FAILED**" in markdown


def test_refused_messages_are_listed_without_failing_the_run(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", rounds=1, dp=gaussian())
    path = run_dir / "transcripts" / "round_0000.json"
    transcript = Transcript.from_dict(json.loads(path.read_text()))
    transcript.rejections.append(
        RejectionRecord("masked_input", 3, "SessionMismatch", "replayed from another session")
    )
    path.write_text(json.dumps(transcript.to_dict()))
    assert main(["audit", str(run_dir)]) == 0
    report, markdown = read_report(run_dir)
    line = "round 0: SessionMismatch from client 3 at masked_input: replayed from another session"
    assert report["refused_messages"] == [line]
    assert f"- {line}" in markdown


def test_metrics_that_disagree_with_the_transcripts_fail_consistency(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", rounds=2, dp=gaussian())
    (run_dir / "transcripts" / "round_0000.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["contributors"] = 6  # the release had 5
    lines[1] = json.dumps(record)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["audit", str(run_dir)]) == 1
    report, _ = read_report(run_dir)
    check = next(c for c in report["checks"] if c["name"] == "run_consistency")
    assert check["reasons"] == [
        "round 0: no transcript (transcripts/round_0000.json)",
        "round 1: metrics report 6 contributors, the transcript's release has 5",
    ]


def test_an_integer_mechanism_without_its_parameters_is_not_accounted_as_gaussian(
    tmp_path: Path,
) -> None:
    dp = {**gaussian(), "mechanism": "skellam"}
    run_dir = write_run(tmp_path / "run", rounds=1, dp=dp)
    assert main(["audit", str(run_dir)]) == 1
    report, _ = read_report(run_dir)
    assert report["differential_privacy"]["epsilon_total"] is None
    check = next(c for c in report["checks"] if c["name"] == "dp_accounting")
    assert check["status"] == "failed"
    assert "l2_sensitivity, l1_sensitivity, variance" in check["reasons"][0]


def test_skellam_record_from_the_calibration_is_accounted_like_the_calibration(
    tmp_path: Path,
) -> None:
    params = DpParams(32, DIM, 1.0, 256.0, NoiseSpec("skellam", 300.0), os.urandom(32), 6)
    dp = {
        "mechanism": "skellam",
        "dp_event": release_event(params, len(COHORT)).to_dict(),
        "delta": DELTA,
    }
    run_dir = write_run(tmp_path / "run", rounds=1, dp=dp)
    assert main(["audit", str(run_dir)]) == 0
    report, markdown = read_report(run_dir)
    expected, _ = round_epsilon(
        "skellam",
        params.l2_sensitivity,
        params.l1_sensitivity,
        params.noise.stddev,
        len(COHORT),
        params.encoded_dim,
        1,
        DELTA,
    )
    assert report["differential_privacy"]["epsilon_total"] == pytest.approx(expected, rel=1e-6)
    assert "ideal noise distributions" in report["differential_privacy"]["statement"]
    assert "| skellam |" in markdown


def test_not_a_run_directory_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsec audit: error:") and "is not a run directory" in err
    assert err.count("\n") == 1
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{oops\n')
    assert main(["audit", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


FIXED_SIZE = {
    "institutions": [f"inst-{u}" for u in range(1, 9)],
    "cohort_size": 4,
    "sampling": {"scheme": "fixed-size", "coins": "public (the run's seed)"},
}
#: Four rounds of cohorts of 4 out of 8: every institution is in exactly two releases.
TWICE_EACH = [(1, 2, 3, 4), (5, 6, 7, 8), (1, 2, 5, 6), (3, 4, 7, 8)]


def test_each_figure_names_the_observer_it_holds_against(tmp_path: Path) -> None:
    run_dir = write_run(
        tmp_path / "run",
        rounds=4,
        dp=gaussian(),
        dropped_in=-1,
        cohorts=TWICE_EACH,
        config=FIXED_SIZE,
    )
    assert main(["audit", str(run_dir)]) == 0
    report, markdown = read_report(run_dir)
    dp = report["differential_privacy"]
    assert dp["threat_model"] == "server"
    figures = {f["name"]: f for f in dp["figures"]}
    assert list(figures) == [
        "against the server",
        "against the server, replace-one",
        "amplified by sampling",
    ]
    server = figures["against the server"]
    assert server["applicable"] and "server" in server["observer"]
    assert server["adjacency"].startswith("zero-out")
    assert server["epsilon"] == dp["epsilon_total"]
    assert "no amplification" in server["basis"]
    assert server["event"] == {
        "type": "SelfComposedDpEvent",
        "event": {"type": "GaussianDpEvent", "noise_multiplier": NOISE},
        "count": 2,
    }
    swapped = figures["against the server, replace-one"]
    assert swapped["adjacency"].startswith("replace-one")
    expected, _ = epsilon_for_rounds(GaussianDpEvent(NOISE / 2), 1.0, 2, DELTA)
    assert swapped["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert swapped["epsilon"] > server["epsilon"]
    amplified = figures["amplified by sampling"]
    assert not amplified["applicable"] and amplified["epsilon"] is None
    assert "observer of the released models only" in amplified["observer"]
    assert "Poisson" in amplified["basis"] and "public seed" in amplified["basis"]
    # privacy.md shows the same three rows with their threat models.
    assert "| figure | holds against | neighbouring datasets | ε | δ | basis |" in markdown
    assert "| against the server | the coordinating server" in markdown
    assert "| amplified by sampling | an observer of the released models only" in markdown
    assert "n/a" in markdown and "zero-out" in markdown and "replace-one" in markdown


def test_epsilon_against_the_server_composes_each_institutions_own_releases(
    tmp_path: Path,
) -> None:
    # Every institution is in two of the four releases: epsilon is two releases at full rate,
    # not four (rounds without an institution do not touch its data) and not amplified.
    spread = write_run(
        tmp_path / "spread",
        rounds=4,
        dp=gaussian(),
        dropped_in=-1,
        cohorts=TWICE_EACH,
        config=FIXED_SIZE,
    )
    assert main(["audit", str(spread)]) == 0
    report, _ = read_report(spread)
    two, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), 1.0, 2, DELTA)
    assert report["differential_privacy"]["epsilon_total"] == pytest.approx(two, rel=1e-9)
    assert report["differential_privacy"]["most_releases_per_institution"] == 2
    # A server that puts institution 1 into every round: its epsilon is four releases.
    busy = [(1, 2, 3, 4), (1, 6, 7, 8), (1, 2, 5, 6), (1, 4, 7, 8)]
    skewed = write_run(tmp_path / "skewed", rounds=4, dp=gaussian(), dropped_in=-1, cohorts=busy)
    assert main(["audit", str(skewed)]) == 0
    report, _ = read_report(skewed)
    four, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), 1.0, 4, DELTA)
    assert report["differential_privacy"]["epsilon_total"] == pytest.approx(four, rel=1e-9)


def test_a_release_count_beyond_the_calibrated_target_fails_the_audit(tmp_path: Path) -> None:
    two, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), 1.0, 2, DELTA)
    three, _ = epsilon_for_rounds(GaussianDpEvent(NOISE), 1.0, 3, DELTA)
    dp = {**gaussian(), "epsilon_target": (two + three) / 2}  # noise sized for two releases
    fair = write_run(tmp_path / "fair", rounds=4, dp=dp, dropped_in=-1, cohorts=TWICE_EACH)
    assert main(["audit", str(fair)]) == 0
    busy = [(1, 2, 3, 4), (1, 6, 7, 8), (1, 2, 5, 6), (3, 4, 7, 8)]
    skewed = write_run(tmp_path / "skewed", rounds=4, dp=dp, dropped_in=-1, cohorts=busy)
    assert main(["audit", str(skewed)]) == 1
    report, _ = read_report(skewed)
    check = next(c for c in report["checks"] if c["name"] == "dp_target")
    assert check["status"] == "failed"
    assert "in 3 released sums" in check["reasons"][0]


def test_two_releases_in_one_session_cannot_be_accounted(tmp_path: Path) -> None:
    # The noise is sized for one release per round: a second sum over a different set of
    # contributors would reveal their difference with only part of the noise.
    run_dir = write_run(tmp_path / "run", rounds=1, dp=gaussian(), dropped_in=-1)
    path = run_dir / "transcripts" / "round_0000.json"
    record = json.loads(path.read_text())
    record["releases"].append({**record["releases"][0], "contributors": [1, 2, 3, 4, 5]})
    path.write_text(json.dumps(record))
    assert main(["audit", str(run_dir)]) == 1
    report, _ = read_report(run_dir)
    check = next(c for c in report["checks"] if c["name"] == "dp_accounting")
    assert check["status"] == "failed"
    assert "2 sums released in one session" in check["reasons"][0]
    assert report["differential_privacy"]["epsilon_total"] is None


def test_privacy_md_says_what_each_secure_aggregation_figure_holds_against(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    assert main(["audit", str(run)]) == 0
    text = (run / "privacy.md").read_text()
    assert "## What the figures hold against" in text
    # 6 institutions, t = 4: the recorded quorum (4) keeps U3 unique with one colluder.
    assert "an active server colluding with up to 1 institution(s) per round" in text
    crypto = json.loads((run / "privacy.json").read_text())["cryptography"]
    assert crypto["survivor_set_quorum"] == [4] and crypto["colluders_tolerated"] == [1]

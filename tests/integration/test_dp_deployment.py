"""Distributed DP through the real deployment: the server's ``[dp]`` table, the round's DP codec
on the wire, each institution's own privacy ledger and budget, and a run directory the audit
reads as it reads a simulation's."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from conftest import Deployment

from clients.privacy_ledger import PrivacyLedger
from fl_core.cli import main as fedsec
from fl_core.federation import (
    ClientUpdate,
    DpSettings,
    Federation,
    FederationConfig,
    SecAggSettings,
)
from fl_core.round import client_contribution
from fl_core.round_config import TrainTask
from fl_core.strategies import ClientOptions
from secagg.dp.calibration import release_event, releases_epsilon
from secagg.dp.events import DpEvent
from secagg.params import SessionShape
from server.config import load_server_config
from server.global_model import GlobalModel

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIENTS = 5
EPSILON = 8.0


def test_dp_rounds_are_noised_ledgered_refused_over_budget_and_audited(
    deploy: Callable[..., Deployment],
) -> None:
    d = deploy(CLIENTS, count=2, min_clients=4, stage_timeout_s=60.0, join_timeout_s=120.0)
    server_toml = d.root / "server.toml"
    server_toml.write_text(
        server_toml.read_text() + f"\n[dp]\nepsilon = {EPSILON}\ndelta = 1e-5\nclip = 1.0\n"
    )
    server = d.start_server()
    # Institution 5's budget is below what one release costs it: it refuses every round, and the
    # rounds go on without it (4 contributors, the DP floor of a cohort of 5).
    budgets = {c: "" for c in range(1, CLIENTS)} | {CLIENTS: "[policy]\nmax_epsilon = 0.5\n"}
    clients = {c: d.start_client(c, budgets[c]) for c in budgets}
    assert server.wait_exit(400) == 0, server.text()[-3000:]
    for c in range(1, CLIENTS):
        assert clients[c].wait_exit(60) == 0, clients[c].text()[-2000:]
    # It never contributed: it says so and exits 1, so its operator hears of it.
    assert clients[CLIENTS].wait_exit(60) == 1
    assert "refused all 2 rounds" in clients[CLIENTS].text()
    assert "max_epsilon" in clients[CLIENTS].text()
    assert "left round 0" in server.text() and "max_epsilon" in server.text()

    run = d.root / "state" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(r["contributors"] == [f"client-{c}" for c in range(1, CLIENTS)] for r in records)
    assert all(r["min_release"] >= 4 for r in records)
    described = json.loads((run / "run.json").read_text())
    assert described["deployment"] is True and described["dp"]["clip_l2"] == 1.0

    # Each institution's own account, computed from what it was sent, matches the server's.
    server_events = [DpEvent.from_dict(r["dp_event"]) for r in records]
    server_epsilon = releases_epsilon(server_events, 1e-5)
    assert 0 < server_epsilon <= EPSILON
    for c in range(1, CLIENTS):
        ledger = PrivacyLedger.load(
            d.root / f"client-{c}" / "privacy-ledger.json", None, False, 1e-5
        )
        assert len(ledger.entries) == 2
        assert ledger.spent() == pytest.approx(server_epsilon, rel=1e-9)
    refused = d.root / f"client-{CLIENTS}" / "privacy-ledger.json"
    assert not refused.exists()  # nothing of institution 5 left it, nothing was charged

    # The audit reads the deployment's run directory: every transcript check passes.
    assert fedsec(["audit", str(run)]) == 0
    report = json.loads((run / "privacy.json").read_text())
    assert report["passed"] is True
    assert report["differential_privacy"]["epsilon_total"] == pytest.approx(server_epsilon)


TRAIN = """
[train]
institutions = 4
records = 12
lora_rank = 2
lora_alpha = 4
lora_mode = "ffa"
max_length = 64
threads = 1
"""


def _l2_clip(vector: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector if norm <= clip else vector * (clip / norm)


def test_dp_scaffold_deployment_is_the_round_core_plus_the_calibrated_noise(
    deploy: Callable[..., Deployment],
) -> None:
    """4 institutions, 3 rounds, SCAFFOLD, DP at epsilon 8, over gRPC. Each round is replayed in
    process from the deployment's previous checkpoint (global vector and SCAFFOLD's server
    control): every institution's training, the round core's contribution, the DP clip. The
    released sum differs from that noise-free sum by exactly the calibrated noise (its RMS
    within 15 % of the calibration's), so the deployment adds no less and no more noise than
    the simulation; the epsilon is the one the in-process federation calibrates for the same
    run; the audit passes."""
    clients, rounds = 4, 3
    d = deploy(clients, count=rounds, min_clients=3, stage_timeout_s=300.0, join_timeout_s=600.0)
    training = d.set_up_training(
        TRAIN,
        12,
        lambda adapter: (
            f"""[task]
kind = "train"
initial_adapter = "{adapter}"
lora_mode = "ffa"
strategy = "scaffold"
local_steps = 2
lr = 0.05
batch_size = 4

[dp]
epsilon = {EPSILON}
"""
        ),
    )
    names, extras, trainers = training.names, training.extras, training.trainers
    server_toml = d.root / "server.toml"
    server_config = load_server_config(server_toml)  # start_server rewrites the file
    server = d.start_server()
    procs = [d.start_client(c, extras[c]) for c in extras]
    assert server.wait_exit(900) == 0, server.text()[-3000:]
    for proc in procs:
        assert proc.wait_exit(30) == 0

    checkpoints = d.root / "state" / "checkpoints"
    for number in range(rounds):
        model = GlobalModel(server_config)
        if number > 0:
            model.restore(checkpoints / f"round-{number - 1:06d}.safetensors")
        cohort = tuple(range(1, clients + 1))
        config, _ = model.round_config(number, bytes(32), cohort, SessionShape(3, None, 3))
        assert isinstance(config.task, TrainTask)
        start = model.vector.copy()
        c_before = model.strategy.state_dict()["c"]
        control = model.strategy.client_options().server_control
        calibration = model.calibration
        assert calibration is not None
        noise_free = np.zeros(model.strategy.contribution_size())
        for c in sorted(trainers):
            result = trainers[c].train(config.task, start, control)
            unit, weight = client_contribution(
                model.strategy, result.delta, result.num_samples, result.control_delta, dp=True
            )
            assert weight == 1
            noise_free += _l2_clip(unit, calibration.params.clip)
        released = GlobalModel(server_config)
        released.restore(checkpoints / f"round-{number:06d}.safetensors")
        # SCAFFOLD's update, inverted: x += mean(dy); c += (n / N) mean(dc) with n = N here.
        total = np.concatenate(
            [
                (released.vector.astype(np.float64) - start) * clients,
                (released.strategy.state_dict()["c"] - c_before) * clients,
            ]
        )
        residual = total - noise_free
        p = calibration.params
        # Per coordinate of the sum: every client's noise share, and its randomized rounding
        # (variance p(1-p) <= 1/4, 1/6 on average), in units of the scale.
        expected_rms = np.sqrt(clients * (p.noise.stddev**2 + 1 / 6)) / p.scale
        measured_rms = float(np.sqrt(np.mean(residual**2)))
        assert measured_rms == pytest.approx(expected_rms, rel=0.15), number
        # Zero-mean noise: the average residual is within 4 standard errors of 0.
        assert abs(float(residual.mean())) < 4 * expected_rms / np.sqrt(residual.size)

    run = d.root / "state" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    deployed_epsilon = releases_epsilon([DpEvent.from_dict(r["dp_event"]) for r in records], 1e-5)
    in_process = Federation(
        FederationConfig(
            clients=tuple(names),
            rounds=rounds,
            secagg=SecAggSettings(clip=1.0),
            strategy="scaffold",
            dp=DpSettings(epsilon=EPSILON),
        ),
        _NeverTrains(),
        lambda vector: {},
        trainers[1].lm.get_vector(),
        max_samples=12,
    )
    assert in_process.calibration is not None
    assert in_process.min_release == records[0]["min_release"]
    assert in_process.calibration.params.noise == calibration.params.noise
    # Every round released all 4 (more than the floor of 3 the noise is sized for), so both
    # spend less than the calibrated worst case; the in-process run of the same releases spends
    # exactly what the deployment recorded.
    same_releases = [release_event(in_process.calibration.params, clients)] * rounds
    assert all(len(r["contributors"]) == clients for r in records)
    assert deployed_epsilon == pytest.approx(releases_epsilon(same_releases, 1e-5), rel=1e-9)
    assert deployed_epsilon < in_process.calibration.epsilon <= EPSILON
    assert fedsec(["audit", str(run)]) == 0


class _NeverTrains:
    """The in-process federation is built here for its calibration only: no round is run."""

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        raise AssertionError("the in-process federation was not meant to train")


def test_a_dp_client_lost_after_masking_is_in_the_release_and_in_its_ledger(
    deploy: Callable[..., Deployment],
) -> None:
    """Institution 5 is killed after its masked input left (before unmask) in round 0: the
    round completes with its input, exactly as the in-process protocol recovers a dropout
    after masking; its ledger holds that one release; round 1 goes on without it. The server's
    account holds the released rounds, with the contributors each really had."""
    # Round 1 waits join_timeout_s for the lost institution before going on without it.
    d = deploy(CLIENTS, count=2, min_clients=4, stage_timeout_s=10.0, join_timeout_s=25.0)
    server_toml = d.root / "server.toml"
    server_toml.write_text(server_toml.read_text() + f"\n[dp]\nepsilon = {EPSILON}\n")
    server = d.start_server()
    clients = {c: d.start_client(c) for c in range(1, CLIENTS)}
    lost = d.start_client(CLIENTS, '[testing]\nstall_before = "unmask"\nstall_round = 0\n')
    lost.wait_for("stalling before unmask")
    lost.kill()
    assert server.wait_exit(400) == 0, server.text()[-3000:]
    for proc in clients.values():
        assert proc.wait_exit(60) == 0

    run = d.root / "state" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert records[0]["contributors"] == [f"client-{c}" for c in range(1, CLIENTS + 1)]
    assert records[1]["contributors"] == [f"client-{c}" for c in range(1, CLIENTS)]
    events = [DpEvent.from_dict(r["dp_event"]) for r in records]
    server_epsilon = releases_epsilon(events, 1e-5)
    # A client charges a release when its masked input leaves, at the release floor (it cannot
    # know how many others will be in the sum; an active server could claim fewer): never less
    # than the server's record of the same release, equal when the release is at the floor.
    ledger = PrivacyLedger.load(
        d.root / f"client-{CLIENTS}" / "privacy-ledger.json", None, False, 1e-5
    )
    assert [e["round"] for e in ledger.entries] == [0]
    assert ledger.spent() >= releases_epsilon(events[:1], 1e-5)
    for c in range(1, CLIENTS):
        kept = PrivacyLedger.load(d.root / f"client-{c}" / "privacy-ledger.json", None, False, 1e-5)
        assert [e["round"] for e in kept.entries] == [0, 1]
        assert kept.events()[1] == events[1]  # round 1 released exactly the floor, 4
        assert kept.spent() >= server_epsilon
    assert fedsec(["audit", str(run)]) == 0

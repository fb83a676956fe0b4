"""Calibration: meets the target for the worst-case cohort, fits the ring, refuses what cannot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from proofs.accountant import (
    DistributedDiscreteGaussianDpEvent,
    DpEvent,
    RdpAccountant,
    SkellamDpEvent,
)
from secagg.dp.calibration import Calibration, calibrate, release_event, round_epsilon
from secagg.dp.encoder import DpEncoder, check_no_wrap, sum_magnitude_bound
from secagg.errors import ConfigurationError

SEED = bytes(range(32))
BASE = {
    "epsilon": 4.0,
    "delta": 1e-5,
    "participations": 50,
    "expected_cohort": 20,
    "dropouts": 5,
    "ring_bits": 32,
    "clip": 0.5,
    "dim": 5000,
    "seed": SEED,
}


@pytest.fixture(scope="module", params=["skellam", "discrete_gaussian"])
def calibrated(request: pytest.FixtureRequest) -> Calibration:
    return calibrate(mechanism=request.param, **BASE)  # type: ignore[arg-type]


def test_calibration_meets_the_target_for_the_fewest_contributors(
    calibrated: Calibration,
) -> None:
    cal = calibrated
    p = cal.params
    assert cal.min_contributors == 15 and p.max_clients == 20
    assert cal.epsilon <= 4.0 and cal.delta <= 1e-5
    # Tight: 2% less noise would overspend (the search is not just conservative).
    eps_less, _ = round_epsilon(
        p.noise.mechanism,
        p.l2_sensitivity,
        p.l1_sensitivity,
        0.98 * p.noise.stddev,
        15,
        p.encoded_dim,
        50,
        1e-5,
    )
    assert eps_less > 4.0
    # More survivors only add noise, so they only lower epsilon.
    eps_all, _ = round_epsilon(
        p.noise.mechanism,
        p.l2_sensitivity,
        p.l1_sensitivity,
        p.noise.stddev,
        20,
        p.encoded_dim,
        50,
        1e-5,
    )
    assert eps_all < cal.epsilon
    # The ring holds the largest cohort's noisy sum with room to spare.
    assert sum_magnitude_bound(p, 20) < 2.0**31
    assert cal.wrap_probability == check_no_wrap(p) <= 8192 * 2.0**-40
    assert cal.noise_std_over_clip == pytest.approx(math.sqrt(15) * p.noise.stddev / p.scale / 0.5)
    assert 1 <= cal.sensitivity_inflation < 1.01
    assert cal.rounding_std_over_clip < 0.01 * cal.noise_std_over_clip


def test_the_target_holds_against_the_server_without_amplification(
    calibrated: Calibration,
) -> None:
    # The accountant of the audit, fed the 50 releases of one client at full rate (the server
    # knows the cohorts), with the fewest contributors a release may have.
    cal, p = calibrated, calibrated.params
    event: DpEvent
    if p.noise.mechanism == "skellam":
        event = SkellamDpEvent(p.l2_sensitivity, p.l1_sensitivity, 15 * p.noise.variance)
    else:
        event = DistributedDiscreteGaussianDpEvent(
            p.l2_sensitivity, p.l1_sensitivity, p.noise.stddev, 15, p.encoded_dim
        )
    assert RdpAccountant().compose(event, 50).get_epsilon(1e-5) <= cal.epsilon <= 4.0
    summary = cal.summary()
    assert summary["threat_model"] == "server" and summary["adjacency"] == "zero-out"
    assert summary["participations"] == cal.participations == 50


def test_calibrated_encoder_runs_end_to_end(calibrated: Calibration) -> None:
    cal = calibrated
    encoder = DpEncoder(cal.params)
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(5000).astype(np.float32) * 1e-3 for _ in range(15)]
    total = encoder.encode(updates[0])
    for u in updates[1:]:
        total += encoder.encode(u)
    error = encoder.decode_sum(total, 15) - np.sum(updates, axis=0)
    assert float(error.std()) == pytest.approx(cal.noise_std_over_clip * 0.5, rel=0.1)


def test_the_release_event_is_what_the_audit_reads_back(calibrated: Calibration) -> None:
    params = calibrated.params
    event = release_event(params, 17)
    assert DpEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    if params.noise.mechanism == "skellam":
        assert isinstance(event, SkellamDpEvent)
        assert event.variance == pytest.approx(17 * params.noise.variance)
        assert event.l2_sensitivity == params.l2_sensitivity
    else:
        assert isinstance(event, DistributedDiscreteGaussianDpEvent)
        assert event.num_clients == 17 and event.dim == 8192
        assert event.local_stddev == params.noise.stddev


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"ring_bits": 12}, "ring"),
        ({"dropouts": 20}, "dropouts"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"participations": 0}, "participations"),
        ({"participations": 10**9}, "samples"),
    ],
)
def test_impossible_targets_are_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        calibrate(mechanism="skellam", **{**BASE, **overrides})  # type: ignore[arg-type]

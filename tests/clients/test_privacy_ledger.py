"""An institution's own privacy budget: what it refuses, charges, and keeps across restarts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from clients.privacy_ledger import PrivacyLedger
from fl_core.round import EncodingSpec, RoundPlan
from fl_core.toml_config import ConfigError
from secagg.dp.calibration import calibrate, release_event, releases_epsilon
from secagg.errors import PolicyViolation
from secagg.params import session_shape

COHORT = (1, 2, 3, 4, 5)


def _plan(epsilon: float | None, index: int = 0) -> RoundPlan:
    if epsilon is None:
        codec = EncodingSpec(64, 32, 1.0).codec(len(COHORT))
        return RoundPlan(index, os.urandom(32), COHORT, session_shape(5), codec)
    calibration = calibrate(
        mechanism="skellam",
        epsilon=epsilon,
        delta=1e-5,
        participations=1,
        expected_cohort=5,
        dropouts=1,
        ring_bits=32,
        clip=1.0,
        dim=64,
        seed=os.urandom(32),
    )
    codec = EncodingSpec(64, 32, 1.0, dp=calibration.params).codec(len(COHORT))
    shape = session_shape(5)
    return RoundPlan(index, os.urandom(32), COHORT, shape, codec, calibration.min_contributors)


def test_a_round_is_refused_when_it_would_take_the_institution_over_its_budget(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.load(path, max_epsilon=4.0, require_dp=False, delta=1e-5)
    first = _plan(3.0)
    ledger.check(first, 1)
    ledger.charge(first, first.session_id)
    assert ledger.spent() == pytest.approx(3.0, rel=0.05)
    second = _plan(3.0, index=1)
    # Two such releases compose (RDP) to more than 4, though less than 3 + 3.
    assert 4.0 < releases_epsilon([*ledger.events(), *ledger.events()], 1e-5) < 6.0
    with pytest.raises(PolicyViolation, match="above its budget 4"):
        ledger.check(second, 1)
    # The charge is the release at the fewest contributors the session lets the server release.
    dp = first.codec.dp
    assert dp is not None
    event = release_event(dp, first.min_survivors)
    assert ledger.spent() == releases_epsilon([event], 1e-5)


def test_the_ledger_survives_a_restart_and_refuses_to_start_when_damaged(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.load(path, None, False, 1e-5)
    plan = _plan(2.0)
    ledger.charge(plan, plan.session_id)
    restarted = PrivacyLedger.load(path, None, False, 1e-5)
    assert restarted.spent() == pytest.approx(ledger.spent())
    assert restarted.entries[0]["session"] == plan.session_id.hex()
    path.write_text('{"releases": [{"event": {"type": "Nonsense"}}]}')
    with pytest.raises(ConfigError, match="restore it rather than delete it"):
        PrivacyLedger.load(path, None, False, 1e-5)


def test_require_dp_refuses_a_round_without_noise_and_a_plain_round_costs_nothing(
    tmp_path: Path,
) -> None:
    plain = _plan(None)
    strict = PrivacyLedger.load(None, None, True, 1e-5)
    with pytest.raises(PolicyViolation, match="require_dp"):
        strict.check(plain, 1)
    ledger = PrivacyLedger.load(tmp_path / "ledger.json", 1.0, False, 1e-5)
    ledger.check(plain, 1)
    ledger.charge(plain, plain.session_id)
    assert ledger.entries == [] and not (tmp_path / "ledger.json").exists()


def test_a_server_that_cuts_the_noise_is_refused_from_the_parameters_it_sent() -> None:
    """The charge is computed from the noise the round's config carries, not from anything the
    server claims: a coordinator that halves every client's noise share (plan otherwise the one
    calibrated for epsilon 3) makes the same institution refuse the very first round."""
    honest = _plan(3.0)
    dp = honest.codec.dp
    assert dp is not None
    cut = dataclasses.replace(dp, noise=dataclasses.replace(dp.noise, stddev=dp.noise.stddev / 2))
    attacked = dataclasses.replace(honest, codec=dataclasses.replace(honest.codec, dp=cut))
    ledger = PrivacyLedger.load(None, max_epsilon=4.0, require_dp=False, delta=1e-5)
    ledger.check(honest, 1)  # the calibrated round fits the budget
    with pytest.raises(PolicyViolation, match="above its budget 4"):
        ledger.check(attacked, 1)

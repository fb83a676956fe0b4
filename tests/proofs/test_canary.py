"""Canary audit: exposure ranks, the empirical epsilon lower bound, and one tiny end-to-end run."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from clients.model_factory import TinyLlamaSpec
from proofs.canary import (
    CanaryAuditConfig,
    Exposure,
    clopper_pearson_lower,
    epsilon_lower_bound,
    exposure_from_losses,
    make_canaries,
    run_canary_audit,
)
from secagg.errors import ConfigurationError

# Simulated rank data for the statistics tests (not secrets): seeded for reproducibility.
RNG = np.random.default_rng(5)


def test_exposure_counts_ties_against_the_canary() -> None:
    canary = np.array([1.0, 5.0, 2.0])
    refs = np.array([[2.0, 3.0, 4.0], [1.0, 2.0, 6.0], [2.0, 2.0, 0.5]])
    exposure = exposure_from_losses(canary, refs)
    assert exposure.at_least_as_good == (0, 2, 3)
    assert exposure.exposures == (2.0, 2.0 - math.log2(3), 0.0)
    assert exposure.ceiling == 2.0
    with pytest.raises(ConfigurationError):
        exposure_from_losses(canary, refs[:2])


def test_clopper_pearson_matches_closed_forms() -> None:
    # All hits: the bound solves p^k = alpha.
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_lower(30, 100, 0.05) < 0.3
    with pytest.raises(ConfigurationError):
        clopper_pearson_lower(11, 10, 0.05)


def test_every_canary_ranked_first_gives_the_closed_form_bound() -> None:
    exposure = Exposure(63, (0,) * 16)
    bound = epsilon_lower_bound(exposure, delta=1e-5, confidence=0.95, thresholds=(0,))
    p_in = 0.05 ** (1 / 16)
    assert bound.threshold == 0 and bound.hits == 16
    assert bound.epsilon == pytest.approx(math.log((p_in - 1e-5) * 64))


def test_no_leakage_gives_no_positive_bound_beyond_the_error_rate() -> None:
    # Without the canary institution, canary and candidates are exchangeable: ranks uniform.
    positives = sum(
        epsilon_lower_bound(Exposure(63, tuple(RNG.integers(0, 64, size=32))), 1e-5).epsilon > 0
        for _ in range(400)
    )
    assert positives <= 0.05 * 400 * 1.5  # the bound is valid at 95% confidence


def test_bound_recovers_most_of_a_known_epsilon_and_never_exceeds_it() -> None:
    # A mechanism that is exactly epsilon-DP for the event "canary ranked first":
    # P_in(first) = e^epsilon / (m + 1).
    epsilon, m, k = 2.0, 63, 4000
    rng = np.random.default_rng(7)  # its own stream: the outcome must not depend on test order
    first = rng.random(k) < math.exp(epsilon) / (m + 1)
    counts = np.where(first, 0, rng.integers(1, m + 1, size=k))
    bound = epsilon_lower_bound(Exposure(m, tuple(int(c) for c in counts)), delta=0.0)
    assert 1.6 < bound.epsilon <= epsilon
    assert bound.threshold == 0


def test_canaries_are_distinct_and_well_formed() -> None:
    canaries = make_canaries(12, 4, random.Random(1))
    assert len({c.name for c in canaries}) == 12
    assert all(len(c.secret) == 4 and c.secret.isdigit() for c in canaries)
    record = canaries[0].record("0000")
    assert record.output.endswith("is 0000.") and canaries[0].name in record.instruction
    with pytest.raises(ConfigurationError):
        make_canaries(0, 4, random.Random(1))


def test_tiny_federated_audit_runs_both_arms_consistently() -> None:
    config = CanaryAuditConfig(
        institutions=3,
        records_per_institution=16,
        rounds=1,
        local_steps=1,
        batch_size=8,
        canaries=6,
        repeats=2,
        references=15,
        model=TinyLlamaSpec(
            hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=96
        ),
        lora_rank=2,
    )
    report = run_canary_audit(config)
    plain, private = report.without_dp, report.with_dp
    assert math.isinf(plain.epsilon_accountant)
    assert math.isfinite(private.epsilon_accountant) and private.epsilon_accountant > 0
    for arm in (plain, private):
        assert len(arm.exposure.at_least_as_good) == 6
        assert all(0 <= c <= 15 for c in arm.exposure.at_least_as_good)
        assert 0.0 <= arm.exposure.mean <= arm.exposure.ceiling == 4.0
        assert math.isfinite(arm.final_train_loss)
    assert report.consistent
    summary = report.to_dict()
    assert summary["without_dp"]["epsilon_accountant"] is None  # type: ignore[index]

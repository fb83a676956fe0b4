"""DP guidance: the noise-to-signal ratio of the mean update, and the cohort that brings it to 1."""

from __future__ import annotations

import math
from collections.abc import Callable

from fl_core.dp_guidance import cohort_calibrator, guidance, noise_to_signal
from secagg.dp.calibration import Calibration
from secagg.params import release_floor

DIM = 20_000


def calibrator(epsilon: float) -> Callable[[int], Calibration]:
    return cohort_calibrator(
        mechanism="skellam",
        epsilon=epsilon,
        delta=1e-5,
        participations=8,
        ring_bits=32,
        clip=1.0,
        dim=DIM,
        min_release=lambda n: release_floor(n, max(2, n // 2), 0.05),
    )


def test_four_institutions_at_epsilon_8_are_warned_with_the_cohort_that_would_do() -> None:
    at = calibrator(8.0)
    first = at(4)
    advice = guidance(first, epsilon=8.0, cohort=4, dim=DIM, calibrate_cohort=at)
    assert advice.too_noisy and advice.ratio > 10
    n = advice.cohort_for_ratio_one
    assert n is not None and n > 4
    # The smallest such cohort: one fewer is still too noisy.
    assert noise_to_signal(at(n), DIM) <= 1.0 < noise_to_signal(at(n - 1), DIM)
    text = advice.message()
    assert text.startswith("WARNING: DP noise") and f"cohort of {n} institutions" in text
    assert "\n" not in text


def test_a_quiet_enough_setting_is_not_warned() -> None:
    at = calibrator(8.0)
    advice = guidance(at(2000), epsilon=8.0, cohort=2000, dim=DIM, calibrate_cohort=at)
    assert not advice.too_noisy and advice.message().endswith(".")
    assert advice.to_json()["warning"] is False
    assert math.isclose(advice.ratio, noise_to_signal(at(2000), DIM), rel_tol=0.01)

"""How much the DP noise drowns the averaged update, said before any training starts.

With distributed DP each round's mean update is ``(sum of clipped updates + noise) / n``. Every
clipped update has L2 norm at most C, so the mean's norm is at most C; the noise's norm in the
mean is about ``sigma * sqrt(d) / n`` with ``sigma`` the noise's standard deviation per
coordinate of the sum (rounding included) and ``d`` the number of coordinates.
:func:`noise_to_signal` is their ratio at the fewest contributors the round may release, taken
from :func:`secagg.dp.calibration.calibrate`'s own figures. It is a lower bound: a real mean
update is shorter than C (the clients' updates point in different directions).

Above 1, more of each round's step is noise than signal, and training is expected to get
*worse* (the embedded demo with epsilon 8 and 4 institutions: eval loss 8.0 -> 24.0). At a
fixed epsilon, sampling rate and clip, the noise multiplier barely moves with the cohort while
the mean divides by n, so a larger cohort fixes it: :func:`guidance` finds the smallest cohort
whose ratio is at most 1, by calibrating (never by a formula of its own) at candidate sizes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from secagg.dp.calibration import Calibration, calibrate
from secagg.dp.noise import Mechanism
from secagg.errors import ConfigurationError

#: Largest cohort the search tries (calibration gets slow and rings overflow beyond).
MAX_COHORT = 1 << 20


def noise_to_signal(calibration: Calibration, dim: int) -> float:
    """L2 norm of the noise in the mean update over the clip norm C, worst case (fewest
    contributors)."""
    sigma = math.hypot(calibration.noise_std_over_clip, calibration.rounding_std_over_clip)
    return sigma * math.sqrt(dim) / calibration.min_contributors


@dataclass(frozen=True)
class NoiseGuidance:
    epsilon: float
    cohort: int
    min_contributors: int
    clip: float
    dim: int
    ratio: float
    #: Smallest cohort (same epsilon, rounds, sampling rate, clip) whose ratio is <= 1, or None
    #: when no cohort up to ``searched_to`` gets there (e.g. the ring cannot hold the sum).
    cohort_for_ratio_one: int | None
    searched_to: int

    @property
    def too_noisy(self) -> bool:
        return self.ratio > 1.0

    def message(self) -> str:
        head = (
            f"DP noise: the averaged update's noise is {self.ratio:.3g}x the largest possible "
            f"signal (epsilon {self.epsilon:g}, {self.min_contributors} of a cohort of "
            f"{self.cohort} released at least, clip {self.clip:g}, {self.dim} coordinates)"
        )
        if not self.too_noisy:
            return head + "."
        if self.cohort_for_ratio_one is None:
            fix = (
                f"no cohort up to {self.searched_to} brings it to 1; raise epsilon or train "
                "fewer coordinates (lower rank, FFA-LoRA, fewer target modules)"
            )
        else:
            fix = (
                f"it falls to 1 at a cohort of {self.cohort_for_ratio_one} institutions per "
                "round; or raise epsilon, or train fewer coordinates"
            )
        return f"WARNING: {head}: training is expected to get worse, not better; {fix}."

    def to_json(self) -> dict[str, object]:
        return {
            "noise_to_signal": self.ratio,
            "cohort": self.cohort,
            "min_contributors": self.min_contributors,
            "cohort_for_ratio_one": self.cohort_for_ratio_one,
            "searched_to": self.searched_to,
            "warning": self.too_noisy,
        }


def guidance(
    calibration: Calibration,
    *,
    epsilon: float,
    cohort: int,
    dim: int,
    calibrate_cohort: Callable[[int], Calibration],
) -> NoiseGuidance:
    """The ratio for ``calibration`` and, when it exceeds 1, the cohort at which it would not.

    ``calibrate_cohort(n)`` must calibrate the same run with a cohort of ``n`` (see
    :func:`cohort_calibrator`); a size it refuses (:class:`ConfigurationError`) counts as
    infeasible.
    """
    ratio = noise_to_signal(calibration, dim)
    clip = calibration.params.clip

    def fits(n: int) -> bool:
        try:
            return noise_to_signal(calibrate_cohort(n), dim) <= 1.0
        except ConfigurationError:
            return False

    if ratio <= 1.0:
        return NoiseGuidance(
            epsilon, cohort, calibration.min_contributors, clip, dim, ratio, cohort, cohort
        )
    # The ratio falls about as 1/n: start from that estimate, double until it fits, bisect.
    low, high = cohort, min(MAX_COHORT, max(cohort + 1, math.ceil(cohort * ratio * 1.05)))
    while not fits(high):
        if high >= MAX_COHORT:
            return NoiseGuidance(
                epsilon, cohort, calibration.min_contributors, clip, dim, ratio, None, high
            )
        low, high = high, min(MAX_COHORT, 2 * high)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return NoiseGuidance(
        epsilon, cohort, calibration.min_contributors, clip, dim, ratio, high, high
    )


def cohort_calibrator(
    *,
    mechanism: Mechanism,
    epsilon: float,
    delta: float,
    participations: int,
    ring_bits: int,
    clip: float,
    dim: int,
    min_release: Callable[[int], int],
) -> Callable[[int], Calibration]:
    """``n -> calibrate(...)`` for a run like this one with a cohort of ``n`` (each institution in
    as many releases as here, so a larger population), releasing at least ``min_release(n)``
    contributors."""

    def run(n: int) -> Calibration:
        return calibrate(
            mechanism=mechanism,
            epsilon=epsilon,
            delta=delta,
            participations=participations,
            expected_cohort=n,
            dropouts=n - min_release(n),
            ring_bits=ring_bits,
            clip=clip,
            dim=dim,
            seed=os.urandom(32),
        )

    return run

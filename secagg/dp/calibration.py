"""Choose the DP noise, scale and ring check for a privacy target, and state the utility cost.

Input: (epsilon, delta) for a client whose update is in ``participations`` released sums, the
expected cohort and the number of dropouts tolerated, the ring, the clip norm and the dimension.
Output: the round's public :class:`~secagg.dp.encoder.DpParams` and a :class:`Calibration`
report.

Threat model: the epsilon is the one *against the server*. The server picks or sees every
cohort (fedsec's cohorts are fixed-size and drawn from the run's public seed), so sampling
hides nothing from it: each round a client takes part in composes at full rate, and a round it
is not in does not touch its data. No subsampling amplification is claimed, for anyone: it
would need Poisson sampling with coins the observer cannot see, which fedsec does not do.

Adjacency: zero-out, client level -- one institution's clipped update replaced by zero, with
the cohort, the contributor count and every client's noise unchanged (each contribution is
clipped and conditionally rounded to L2 norm at most ``DpParams.l2_sensitivity`` and L1 norm at
most ``l1_sensitivity``, which is exactly the sum's change when one is zeroed). Replacing one
institution's data by any other is two zero-out steps: the same mechanism at twice the
sensitivity (:func:`proofs.accountant.replace_one`).

Worst case for privacy: each client's share of the noise is sized so that the *fewest*
contributors the round accepts (expected cohort minus tolerated dropouts) still add enough;
more survivors only add noise. Worst case for wrap-around: the *largest* cohort (``max_cohort``,
default the expected cohort) with all its noise.

Scale (TFF ``DistributedDpSumFactory`` / Kairouz et al. Sec. 5 heuristics): a larger scale
shrinks the rounding's inflation of the sensitivity (the d/4 term of the conditional-rounding
bound) and the Skellam/discrete-Gaussian surcharge, so the noise in update units only falls as
the scale grows; the scale is therefore the largest one for which the noisy sum fits the ring
with the stated wrap probability and the per-client noise fits the sampler's table. It is found
by a fixed-point iteration on the (nearly linear in the scale) magnitude bound, then verified.

Sampler precision is charged as well: :meth:`secagg.dp.noise.SamplerDeviation.adjust` with
samples = participations x max cohort x padded dimension (the noise in the releases that hold
the client's update) turns the ideal mechanism's guarantee into the implemented one's; the
calibration targets the ideal mechanism at the reduced budget so that the implemented
guarantee meets (epsilon, delta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secagg.dp.encoder import (
    DEFAULT_BETA,
    WRAP_PROBABILITY,
    DpParams,
    check_no_wrap,
    sum_magnitude_bound,
)
from secagg.dp.events import DistributedDiscreteGaussianDpEvent, DpEvent, SkellamDpEvent
from secagg.dp.noise import DEVIATION_BOUND, MAX_STDDEV, Mechanism, NoiseSpec, sampler_for
from secagg.dp.rdp import (
    DEFAULT_RDP_ORDERS,
    ddgauss_curve,
    epsilon_from_rdp,
    rdp_integer_mechanism,
    skellam_curve,
)
from secagg.dp.rotation import padded_dim
from secagg.errors import ConfigurationError

#: Who the calibrated epsilon holds against, and for which neighbouring datasets (module doc).
THREAT_MODEL = "server"
ADJACENCY = "zero-out"

#: Smallest per-client stddev considered (integer units); below it the noise is meaningless.
_MIN_STDDEV = 1e-3
_STDDEV_PRECISION = 1e-4
#: The scale search keeps this fraction of the ring's half-range as slack for the final check.
_RING_FILL = 0.95


def round_epsilon(
    mechanism: Mechanism,
    l2_sensitivity: float,
    l1_sensitivity: float,
    local_stddev: float,
    n_contributors: int,
    dim: int,
    participations: int,
    delta: float,
) -> tuple[float, float]:
    """(epsilon, order) of ``participations`` releases of the ideal distributed mechanism with
    ``n_contributors`` clients each adding noise of scale ``local_stddev``, composed at full
    rate (no subsampling amplification: see the module doc)."""
    curve = (
        skellam_curve(l2_sensitivity, l1_sensitivity, n_contributors * local_stddev**2)
        if mechanism == "skellam"
        else ddgauss_curve(l2_sensitivity, l1_sensitivity, local_stddev, n_contributors, dim)
    )
    rdp = participations * rdp_integer_mechanism(curve, 1.0, DEFAULT_RDP_ORDERS)
    return epsilon_from_rdp(DEFAULT_RDP_ORDERS, rdp.tolist(), delta)


def releases_epsilon(events: Sequence[DpEvent], delta: float) -> float:
    """The epsilon (at ``delta``) of the releases ``events`` composed at full rate: what one
    institution spends against the server when its noised input is in each of them."""
    if not events:
        return 0.0
    rdp = np.zeros(len(DEFAULT_RDP_ORDERS))
    for event in events:
        if isinstance(event, SkellamDpEvent):
            curve = skellam_curve(event.l2_sensitivity, event.l1_sensitivity, event.variance)
        elif isinstance(event, DistributedDiscreteGaussianDpEvent):
            curve = ddgauss_curve(
                event.l2_sensitivity,
                event.l1_sensitivity,
                event.local_stddev,
                event.num_clients,
                event.dim,
            )
        else:
            raise ConfigurationError(f"no release accounting for {type(event).__name__}")
        rdp += rdp_integer_mechanism(curve, 1.0, DEFAULT_RDP_ORDERS)
    return epsilon_from_rdp(DEFAULT_RDP_ORDERS, rdp.tolist(), delta)[0]


@dataclass(frozen=True)
class Calibration:
    """The chosen parameters and what they cost. Noise figures are per coordinate of the
    decoded *sum*, in units of the clip norm C (divide by the contributor count for the mean)."""

    params: DpParams
    min_contributors: int
    participations: int  # most released sums one client's update is in (each at full rate)
    epsilon: float  # against the server, implemented mechanism (sampler deviation included)
    delta: float
    order: float  # RDP order the ideal mechanism's epsilon came from
    noise_multiplier: float  # central noise std / L2 sensitivity, worst case (fewest clients)
    noise_std_over_clip: float  # central noise std in update units / C, worst case
    noise_std_over_clip_max_cohort: float  # same with the largest cohort (more noise)
    rounding_std_over_clip: float  # bound on the rounding error's std, worst case, / C
    sensitivity_inflation: float  # rounded L2 sensitivity / (scale * C)
    wrap_probability: float  # union bound over coordinates, largest cohort
    sampler_samples: int  # noise samples the sampler-deviation charge was computed for

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for logs and run reports."""
        p = self.params
        return {
            "mechanism": p.noise.mechanism,
            "epsilon": self.epsilon,
            "threat_model": THREAT_MODEL,
            "adjacency": ADJACENCY,
            "participations": self.participations,
            "delta": self.delta,
            "order": self.order,
            "scale": p.scale,
            "local_stddev": p.noise.stddev,
            "min_contributors": self.min_contributors,
            "max_contributors": p.max_clients,
            "noise_multiplier": self.noise_multiplier,
            "noise_std_over_clip": self.noise_std_over_clip,
            "noise_std_over_clip_max_cohort": self.noise_std_over_clip_max_cohort,
            "rounding_std_over_clip": self.rounding_std_over_clip,
            "sensitivity_inflation": self.sensitivity_inflation,
            "wrap_probability": self.wrap_probability,
            "ring_bits": p.ring_bits,
        }


def release_event(params: DpParams, n_contributors: int) -> DpEvent:
    """The privacy event of one release of ``n_contributors`` clients' noised sum (at full
    rate: zero-out, against the server), for the run record and the audit."""
    if params.noise.mechanism == "skellam":
        return SkellamDpEvent(
            params.l2_sensitivity,
            params.l1_sensitivity,
            n_contributors * params.noise.variance,
        )
    return DistributedDiscreteGaussianDpEvent(
        params.l2_sensitivity,
        params.l1_sensitivity,
        params.noise.stddev,
        n_contributors,
        params.encoded_dim,
    )


def calibrate(
    *,
    mechanism: Mechanism,
    epsilon: float,
    delta: float,
    participations: int,
    expected_cohort: int,
    dropouts: int,
    ring_bits: int,
    clip: float,
    dim: int,
    seed: bytes,
    max_cohort: int | None = None,
    beta: float = DEFAULT_BETA,
    wrap_probability: float = WRAP_PROBABILITY,
) -> Calibration:
    """Noise and scale meeting (epsilon, delta) against the server for a client whose update is
    in ``participations`` released sums (the most rounds any one client takes part in); see
    the module doc."""
    _check_target(epsilon, delta, participations)
    if expected_cohort < 1 or not 0 <= dropouts < expected_cohort:
        raise ConfigurationError(
            f"need 0 <= dropouts < expected cohort, got {dropouts} of {expected_cohort}"
        )
    n_min = expected_cohort - dropouts
    n_max = expected_cohort if max_cohort is None else max_cohort
    if n_max < expected_cohort:
        raise ConfigurationError("max_cohort cannot be below the expected cohort")
    n_pad = padded_dim(dim)

    # Sampler precision: reduce the ideal mechanism's budget so the implemented one meets it.
    samples = participations * n_max * n_pad
    ideal_eps, ideal_delta = _ideal_budget(epsilon, delta, samples)

    def params_for(scale: float, stddev: float) -> DpParams:
        return DpParams(
            ring_bits=ring_bits,
            dim=dim,
            clip=clip,
            scale=scale,
            noise=NoiseSpec(mechanism, stddev),
            seed=seed,
            max_clients=n_max,
            beta=beta,
        )

    def stddev_for(scale: float, guess: float | None) -> float:
        """Smallest per-client stddev (integer units, to 1e-4 relative) meeting the ideal
        budget at this scale; ``guess`` (the answer at a nearby scale) narrows the bracket."""
        probe = params_for(scale, 1.0)
        l2, l1 = probe.l2_sensitivity, probe.l1_sensitivity

        def ok(stddev: float) -> bool:
            eps, _ = round_epsilon(
                mechanism, l2, l1, stddev, n_min, n_pad, participations, ideal_delta
            )
            return eps <= ideal_eps

        lo, hi = (1.0, 2.0) if guess is None else (guess / 1.05, guess * 1.05)
        while not ok(hi):
            lo, hi = hi, hi * 4
            if lo > MAX_STDDEV:
                return math.inf
        while lo > _MIN_STDDEV and ok(lo):
            lo, hi = lo / 4, lo
        while hi / lo > 1 + _STDDEV_PRECISION:
            mid = math.sqrt(lo * hi)
            if ok(mid):
                hi = mid
            else:
                lo = mid
        return hi

    half = float(1 << (ring_bits - 1)) * _RING_FILL
    # Start where the signal alone fills the ring, then iterate scale <- scale * half / need.
    scale = half / (n_max * clip * math.sqrt(2 * math.log(4 / wrap_probability) / n_pad) + n_max)
    chosen: tuple[float, float] | None = None
    guess: float | None = None
    for _ in range(12):
        stddev = stddev_for(scale, guess)
        # The stddev needed grows about linearly with the scale: predict the next one.
        guess = stddev if math.isfinite(stddev) else None
        if stddev > MAX_STDDEV:
            factor = 0.9 * MAX_STDDEV / stddev if math.isfinite(stddev) else 0.25
            scale *= factor
            guess = None if guess is None else guess * factor
            continue
        need = sum_magnitude_bound(params_for(scale, stddev), n_max, wrap_probability)
        if need <= half:
            if chosen is None or scale > chosen[0]:
                chosen = (scale, stddev)
            if need >= 0.9 * half or stddev >= 0.9 * MAX_STDDEV:
                break
        factor = 0.98 * half / need
        scale *= factor
        guess = None if guess is None else guess * factor
    if chosen is None:
        raise ConfigurationError(
            f"no scale fits the noisy sum of {n_max} clients in a {ring_bits}-bit ring with "
            f"(epsilon={epsilon}, delta={delta}) over {participations} rounds per client: use "
            "more ring bits, a "
            "larger privacy budget or fewer clients per round"
        )
    scale, stddev = chosen
    params = params_for(scale, stddev)
    wrap = check_no_wrap(params, n_max, wrap_probability)
    ideal_achieved, order = round_epsilon(
        mechanism,
        params.l2_sensitivity,
        params.l1_sensitivity,
        stddev,
        n_min,
        n_pad,
        participations,
        ideal_delta,
    )
    final_eps, final_delta = sampler_for(params.noise).deviation.adjust(
        ideal_achieved, ideal_delta, samples
    )
    central_min = math.sqrt(n_min) * stddev
    central_max = math.sqrt(n_max) * stddev
    return Calibration(
        params=params,
        min_contributors=n_min,
        participations=participations,
        epsilon=final_eps,
        delta=final_delta,
        order=order,
        noise_multiplier=central_min / params.l2_sensitivity,
        noise_std_over_clip=central_min / scale / clip,
        noise_std_over_clip_max_cohort=central_max / scale / clip,
        rounding_std_over_clip=math.sqrt(n_min / 4) / scale / clip,
        sensitivity_inflation=params.l2_sensitivity / (scale * clip),
        wrap_probability=wrap,
        sampler_samples=samples,
    )


def _check_target(epsilon: float, delta: float, participations: int) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigurationError(f"epsilon must be positive, got {epsilon!r}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ConfigurationError(f"delta must be in (0, 1), got {delta!r}")
    if isinstance(participations, bool) or not isinstance(participations, int):
        raise ConfigurationError(f"participations must be an integer, got {participations!r}")
    if participations < 1:
        raise ConfigurationError(f"participations must be at least 1, got {participations!r}")


def _ideal_budget(epsilon: float, delta: float, samples: int) -> tuple[float, float]:
    """The (epsilon, delta) the ideal mechanism must meet so that the implemented one meets the
    target after :meth:`SamplerDeviation.adjust` (whose constants do not depend on the scale)."""
    deviation = DEVIATION_BOUND
    eta = samples * deviation.pmf_relative_error
    ideal_eps = epsilon - 2 * eta
    spare = delta - samples * (
        deviation.tv_additive * (1 + math.exp(epsilon)) + deviation.tail * math.exp(epsilon)
    )
    # The 1 - 2^-30 factors absorb float rounding, so the adjusted figures never exceed the target.
    ideal_eps *= 1 - 2.0**-30
    ideal_delta = spare / math.exp(eta) * (1 - 2.0**-30)
    if ideal_eps <= 0.5 * epsilon or ideal_delta <= 0.5 * delta:
        raise ConfigurationError(
            f"{samples:.3g} noise samples exceed what the sampler's precision can support at "
            "this (epsilon, delta): fewer rounds per client, clients or coordinates"
        )
    return ideal_eps, ideal_delta

"""Choose the DP noise, scale and ring check for a privacy target, and state the utility cost.

Input: (epsilon, delta) over ``rounds`` rounds with client sampling rate q, the expected cohort
and the number of dropouts tolerated, the ring, the clip norm and the dimension. Output: the
round's public :class:`~secagg.dp.encoder.DpParams` and a :class:`Calibration` report.

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

Subsampling: the Skellam and distributed discrete Gaussian curves are amplified with Zhu-Wang's
general bound (see :mod:`proofs.accountant`), as TFF's distributed DP accounting does; it is
looser than the exact sampled-Gaussian series at large q (at q = 0.1, T = 100 it needs about
twice the noise multiplier for the same epsilon), and rigorous where the Gaussian series is not.

Sampler precision is charged as well: :meth:`secagg.dp.noise.SamplerDeviation.adjust` with
samples = rounds x max cohort x padded dimension turns the ideal mechanism's guarantee into the
implemented one's; the calibration targets the ideal mechanism at the reduced budget so that the
implemented guarantee meets (epsilon, delta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from secagg.dp.encoder import (
    DEFAULT_BETA,
    WRAP_PROBABILITY,
    DpParams,
    check_no_wrap,
    sum_magnitude_bound,
)
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
    sampling_rate: float,
    rounds: int,
    delta: float,
) -> tuple[float, float]:
    """(epsilon, order) of ``rounds`` Poisson-sampled rounds of the ideal distributed mechanism
    with ``n_contributors`` clients each adding noise of scale ``local_stddev``."""
    curve = (
        skellam_curve(l2_sensitivity, l1_sensitivity, n_contributors * local_stddev**2)
        if mechanism == "skellam"
        else ddgauss_curve(l2_sensitivity, l1_sensitivity, local_stddev, n_contributors, dim)
    )
    rdp = rounds * rdp_integer_mechanism(curve, sampling_rate, DEFAULT_RDP_ORDERS)
    return epsilon_from_rdp(DEFAULT_RDP_ORDERS, rdp.tolist(), delta)


@dataclass(frozen=True)
class Calibration:
    """The chosen parameters and what they cost. Noise figures are per coordinate of the
    decoded *sum*, in units of the clip norm C (divide by the contributor count for the mean)."""

    params: DpParams
    min_contributors: int
    epsilon: float  # guarantee of the implemented mechanism (sampler deviation included)
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


def accounting_record(
    params: DpParams, n_contributors: int, sampling_rate: float
) -> dict[str, Any]:
    """The fields a metrics record needs for ``proofs`` to account one round with
    ``n_contributors`` actual contributors (the accountant's event parameters)."""
    record: dict[str, Any] = {
        "mechanism": "skellam" if params.noise.mechanism == "skellam" else "ddgauss",
        "sampling_rate": sampling_rate,
        "l2_sensitivity": params.l2_sensitivity,
        "l1_sensitivity": params.l1_sensitivity,
    }
    if params.noise.mechanism == "skellam":
        record["variance"] = n_contributors * params.noise.variance
    else:
        record.update(
            local_stddev=params.noise.stddev,
            num_clients=n_contributors,
            dim=params.encoded_dim,
        )
    return record


def calibrate(
    *,
    mechanism: Mechanism,
    epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float,
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
    """Noise and scale meeting (epsilon, delta) after ``rounds`` rounds; see the module doc."""
    _check_target(epsilon, delta, rounds, sampling_rate)
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
    samples = rounds * n_max * n_pad
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
                mechanism, l2, l1, stddev, n_min, n_pad, sampling_rate, rounds, ideal_delta
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
            f"(epsilon={epsilon}, delta={delta}) over {rounds} rounds: use more ring bits, a "
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
        sampling_rate,
        rounds,
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


def _check_target(epsilon: float, delta: float, rounds: int, sampling_rate: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigurationError(f"epsilon must be positive, got {epsilon!r}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ConfigurationError(f"delta must be in (0, 1), got {delta!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigurationError(f"rounds must be a positive integer, got {rounds!r}")
    if not (math.isfinite(sampling_rate) and 0 < sampling_rate <= 1):
        raise ConfigurationError(f"sampling rate must be in (0, 1], got {sampling_rate!r}")


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
            f"{samples:.3g} noise samples exceed what the sampler's float64 precision can "
            "support at this (epsilon, delta): fewer rounds, clients or coordinates"
        )
    return ideal_eps, ideal_delta

"""Rigorous brackets on the noise PMFs, by integer interval arithmetic (no Bessel library).

The alias tables of :mod:`secagg.dp.noise` are built from these brackets, and the sampler's
charged deviation from the ideal distribution is read off them. For an atom k (by symmetry
only k = 0..K is computed) a :class:`PmfBracket` holds integers ``lo[k] <= t_k 2^P <= hi[k]``,
where ``t_k`` is the PMF relative to the mode, P = :data:`FIXED_BITS`:

* Skellam of variance v: t_k = I_k(v) / I_0(v), with I_k the modified Bessel function of the
  first kind (the Skellam PMF is e^-v I_|k|(v)). The ratios r_k = I_{k+1}(v) / I_k(v) obey the
  three-term recurrence I_{k-1} - I_{k+1} = (2k/v) I_k, i.e. r_{k-1} = 1 / (2k/v + r_k); the
  map is decreasing in r_k, so an interval for r_k gives one for r_{k-1} (floor for the lower
  end, ceiling for the upper). Started from the trivially true 0 <= r_N <= 1 (I_k decreases
  in k for v > 0) far enough above K, the interval narrows geometrically on the way down
  (this is Miller's backward recurrence run on intervals), and t_k = r_0 ... r_{k-1}.
* Discrete Gaussian of scale sigma: t_k = a^(k^2) with a = exp(-1/(2 sigma^2)), bracketed by
  :mod:`decimal`'s ``exp`` (correctly rounded, documented) at 100 digits and widened by a few
  units in the last place; t_{k+1} = t_k a^(2k+1) on intervals.

Every step rounds outward, so the brackets hold whatever the rounding; their width only
decides how small the charged error is. N (Skellam) is picked by a float estimate of the
convergence (I_N / I_K small, from r_k <= v / (k + sqrt(k^2 + v^2))); a poor pick can only
widen the brackets, never invalidate them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal

#: Fixed-point bits of every bracket end (values in units of 2^-FIXED_BITS).
FIXED_BITS = 256
_ONE = 1 << FIXED_BITS
#: Skellam: start the recurrence where the float estimate of (I_N / I_K)^2 is below 2^-this.
_CONVERGENCE_BITS = FIXED_BITS + 20
#: Digits of the decimal computation of exp(-1 / (2 sigma^2)); its bracket is widened by
#: 10^-(_DIGITS - _SLACK_DIGITS) relative, far more than the rounding of the two operations.
_DIGITS = 100
_SLACK_DIGITS = 5


@dataclass(frozen=True)
class PmfBracket:
    """``lo[k] <= 2^FIXED_BITS * PMF(k) / PMF(0) <= hi[k]`` for k = 0..K (symmetric PMF)."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @property
    def support(self) -> int:
        return len(self.lo) - 1

    def relative_width(self) -> float:
        """An upper bound (rounded up to a float) on max_k (hi[k] - lo[k]) / lo[k].

        If every atom's true value lies within a factor 1 + rho of its lower end, the PMF
        normalised from the lower ends over [-K, K] is within a factor exp(+-rho) of the true
        PMF normalised over the same support (ratio of two such factors, each in [1, 1 + rho])."""
        if min(self.lo) <= 0:
            return math.inf
        shift = 2 * FIXED_BITS
        worst = max(((h - lo) << shift) // lo + 1 for lo, h in zip(self.lo, self.hi, strict=True))
        return math.nextafter(math.ldexp(float(worst), -shift), math.inf)


def skellam_bracket(variance: float, support: int) -> PmfBracket:
    """Brackets of I_k(v) / I_0(v), k = 0..``support``, for v = ``variance`` (exactly the float)."""
    num, den = float(variance).as_integer_ratio()  # v = num / den exactly
    start = _recurrence_start(variance, support)
    ratio_lo = [0] * support  # brackets of r_k = I_{k+1} / I_k, k = 0..support-1
    ratio_hi = [0] * support
    lo, hi = 0, _ONE  # 0 <= r_start <= 1
    top = num << (2 * FIXED_BITS)
    for k in range(start, 0, -1):
        # r_{k-1} = 1 / (2k den / num + r_k) = num 2^(2P) / (2k den 2^P + num R_k), R = r 2^P.
        base = (2 * k * den) << FIXED_BITS
        lo, hi = top // (base + num * hi), min(_ONE, -(-top // (base + num * lo)))
        if k <= support:
            ratio_lo[k - 1], ratio_hi[k - 1] = lo, hi
    return PmfBracket(*_products(ratio_lo, ratio_hi))


def discrete_gaussian_bracket(variance: float, support: int) -> PmfBracket:
    """Brackets of exp(-k^2 / (2 sigma^2)), k = 0..``support``, for sigma^2 = ``variance``."""
    near = Context(prec=_DIGITS)
    exponent = near.divide(Decimal(-1), near.multiply(Decimal(2), Decimal(variance)))
    base = near.exp(exponent)
    # Rounding the quotient moves the exponent by at most |exponent| 10^(1 - _DIGITS), which
    # changes exp by about that factor; exp itself is correctly rounded: widen by far more.
    wide = Context(prec=2 * _DIGITS)
    slack = wide.multiply(
        wide.add(wide.minus(exponent), Decimal(1)), wide.power(10, _SLACK_DIGITS - _DIGITS)
    )
    a_lo = max(0, _to_fixed(base, wide.subtract(Decimal(1), slack), ROUND_FLOOR))
    a_hi = min(_ONE, _to_fixed(base, wide.add(Decimal(1), slack), ROUND_CEILING))
    a2_lo, a2_hi = _mul(a_lo, a_lo, floor=True), _mul(a_hi, a_hi, floor=False)
    step_lo, step_hi = [0] * support, [0] * support  # a^(2k+1) = t_{k+1} / t_k
    g_lo, g_hi = a_lo, a_hi
    for k in range(support):
        step_lo[k], step_hi[k] = g_lo, g_hi
        g_lo, g_hi = _mul(g_lo, a2_lo, floor=True), _mul(g_hi, a2_hi, floor=False)
    return PmfBracket(*_products(step_lo, step_hi))


def _recurrence_start(variance: float, support: int) -> int:
    """Smallest N > support with the float estimate of (I_N / I_support)^2 below
    2^-_CONVERGENCE_BITS, from r_k <= v / (k + sqrt(k^2 + v^2)) (a heuristic: see module doc)."""
    target = -_CONVERGENCE_BITS * math.log(2)
    n, total = support, 0.0
    while total > target:
        n += 1
        total += 2 * math.log(variance / (n + math.hypot(n, variance)))
    return n


def _products(ratio_lo: list[int], ratio_hi: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Brackets of t_0 = 1, t_{k+1} = t_k * ratio_k."""
    lo, hi = [_ONE], [_ONE]
    for r_lo, r_hi in zip(ratio_lo, ratio_hi, strict=True):
        lo.append(_mul(lo[-1], r_lo, floor=True))
        hi.append(_mul(hi[-1], r_hi, floor=False))
    return tuple(lo), tuple(hi)


def _mul(x: int, y: int, *, floor: bool) -> int:
    """x * y / 2^P rounded down (``floor``) or up, all in units of 2^-P."""
    product = x * y
    return product >> FIXED_BITS if floor else -((-product) >> FIXED_BITS)


def _to_fixed(value: Decimal, factor: Decimal, rounding: str) -> int:
    """``value * factor * 2^P`` rounded in the given direction, as an integer."""
    directed = Context(prec=3 * _DIGITS, rounding=rounding)
    scaled = directed.multiply(directed.multiply(value, factor), Decimal(_ONE))
    return int(scaled.to_integral_value(rounding=rounding))

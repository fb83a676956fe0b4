"""Rényi-DP curves of the mechanisms fedsec runs, and the RDP -> (epsilon, delta) conversion.

Pure math (numpy + scipy.special), shared by the calibration in :mod:`secagg.dp.calibration`
and the accountant in :mod:`proofs.accountant` (which adds privacy events and composition and
states the references). Sensitivities and noise are in the integer units of the encoder.

* Sampled Gaussian: Mironov, Talwar, Zhang (arXiv:1908.10530) Sec. 3.3, computed exactly as
  ``dp_accounting.rdp`` does (tested against it to 1e-6 relative).
* Skellam: Agarwal, Kairouz, Liu (NeurIPS'21) Thm 3.5, integer orders.
* Distributed discrete Gaussian: Kairouz, Liu, Steinke (ICML'21) Thm 4.
* General Poisson subsampling: Zhu, Wang (ICML'19) Thm 6.
* Conversion: Balle et al. (arXiv:2004.00010) Prop. 12, and the KL bound for tiny RDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from scipy import special

from secagg.errors import ConfigurationError

#: The default order grid of dp_accounting's RdpAccountant.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)

_MAX_STEPS_LOG_A_FRAC = 1000

FloatArray = npt.NDArray[np.float64]


class AccountingError(ConfigurationError):
    """Parameters the accountant cannot account for (out of range, unsupported event)."""


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_comb(n: float, k: float) -> float:
    return float(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1))


def _log_erfc(x: float) -> float:
    return math.log(2) + float(special.log_ndtr(-x * 2**0.5))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    log1mq = math.log1p(-q)
    for i in range(alpha + 1):
        log_coef_i = _log_comb(alpha, i) + i * math.log(q) + (alpha - i) * log1mq
        log_a = _log_add(log_a, log_coef_i + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    # Two halves of the integral split at z0 (Mironov et al. Sec. 3.3); stop when both series
    # are decreasing and negligible (2^-43 relative) against the total.
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log1mq = math.log1p(-q)
    last_s0 = last_s1 = -math.inf
    for i in range(_MAX_STEPS_LOG_A_FRAC):
        log_coef = _log_comb(alpha, i)
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * log1mq
        log_t1 = log_coef + j * math.log(q) + i * log1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        log_a0 = _log_add(log_a0, log_s0)
        log_a1 = _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    # Not converged: this order gives no usable bound, so it is excluded (as dp_accounting does).
    return math.inf


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[float]) -> FloatArray:
    """RDP of the Poisson-sampled Gaussian mechanism at each order (Mironov et al. 2019)."""

    def one(alpha: float) -> float:
        if q == 0:
            return 0.0
        if math.isinf(alpha) or noise_multiplier == 0:
            return math.inf
        if q == 1.0:
            return alpha / (2 * noise_multiplier**2)
        if float(alpha).is_integer():
            log_a = _log_a_int(q, noise_multiplier, int(alpha))
        else:
            log_a = _log_a_frac(q, noise_multiplier, alpha)
        return log_a / (alpha - 1)

    return np.array([one(a) for a in orders], dtype=np.float64)


Curve = Callable[[FloatArray], FloatArray]


def skellam_curve(l2_sensitivity: float, l1_sensitivity: float, variance: float) -> Curve:
    """Agarwal et al. (NeurIPS'21) Thm 3.5 as a function of integer orders > 1 (array), all
    quantities in integer units; ``variance`` is that of the total noise in the released sum."""
    d2sq, d1, mu = l2_sensitivity**2, l1_sensitivity, variance

    def curve(a: FloatArray) -> FloatArray:
        surcharge = np.minimum(((2 * a - 1) * d2sq + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
        return np.asarray(a * d2sq / (2 * mu) + surcharge, dtype=np.float64)

    return curve


def skellam_rdp(l2_sensitivity: float, l1_sensitivity: float, variance: float, order: int) -> float:
    """:func:`skellam_curve` at one order."""
    curve = skellam_curve(l2_sensitivity, l1_sensitivity, variance)
    return float(curve(np.array([float(order)]))[0])


def ddgauss_tau(local_stddev: float, num_clients: int) -> float:
    """Kairouz et al. (ICML'21): Rényi slack of summing discrete Gaussians instead of one."""
    ks = np.arange(1, num_clients, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * (math.pi * local_stddev) ** 2 * ks / (ks + 1)).sum())


def ddgauss_curve(
    l2_sensitivity: float,
    l1_sensitivity: float,
    local_stddev: float,
    num_clients: int,
    dim: int,
) -> Curve:
    """Kairouz et al. (ICML'21) Thm 4: RDP of the sum of ``num_clients`` discrete Gaussians of
    scale ``local_stddev`` on ``dim``-dimensional integer vectors, as a function of the order."""
    central = math.sqrt(num_clients) * local_stddev
    e2 = l2_sensitivity / central
    e1 = l1_sensitivity / central
    tau = ddgauss_tau(local_stddev, num_clients)
    d = dim

    def curve(a: FloatArray) -> FloatArray:
        return np.minimum(
            np.minimum(a / 2 * e2**2 + tau * d, a / 2 * (e2**2 + 2 * e1 * tau + tau**2 * d)),
            a / 2 * (e2 + math.sqrt(d) * tau) ** 2,
        )

    return curve


def ddgauss_rdp(
    l2_sensitivity: float,
    l1_sensitivity: float,
    local_stddev: float,
    num_clients: int,
    dim: int,
    order: int,
) -> float:
    """:func:`ddgauss_curve` at one order."""
    curve = ddgauss_curve(l2_sensitivity, l1_sensitivity, local_stddev, num_clients, dim)
    return float(curve(np.array([float(order)]))[0])


def subsampled_rdp_upper_bounds(
    q: float, rdp_at: FloatArray, orders: npt.NDArray[np.int64]
) -> FloatArray:
    """Zhu & Wang (ICML'19) Thm 6 at each integer order a >= 2 in ``orders``: RDP of the
    Poisson-subsampled mechanism given ``rdp_at[l]``, the base mechanism's RDP at integer l:
    (1/(a-1)) log[(1-q)^(a-1) (aq - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^(rdp(2))
    + 3 sum_{l=3}^{a} C(a,l) q^l (1-q)^(a-l) e^((l-1) rdp(l))], all orders in one array op."""
    a = orders.astype(np.float64)[:, None]
    top = int(orders.max())
    ls = np.arange(2, top + 1, dtype=np.float64)[None, :]
    valid = ls <= a
    log1mq, logq = math.log1p(-q), math.log(q)
    with np.errstate(invalid="ignore"):
        terms = (
            (ls - 1) * rdp_at[None, 2 : top + 1]
            + special.gammaln(a + 1)
            - special.gammaln(ls + 1)
            - special.gammaln(np.where(valid, a - ls, 0.0) + 1)
            + (a - ls) * log1mq
            + ls * logq
        )
    terms = np.where(valid, terms, -np.inf)
    first = (a[:, 0] - 1) * log1mq + np.log(a[:, 0] * q - q + 1)
    top_term = np.maximum(first, terms.max(axis=1))
    weights = np.full(ls.shape, 3.0)
    weights[0, 0] = 1.0  # the l = 2 term has coefficient 1, the l >= 3 terms 3
    total = np.exp(first - top_term) + (weights * np.exp(terms - top_term[:, None])).sum(axis=1)
    return np.asarray((top_term + np.log(total)) / (a[:, 0] - 1), dtype=np.float64)


def subsampled_rdp_upper_bound(q: float, rdp_at: FloatArray, order: int) -> float:
    """:func:`subsampled_rdp_upper_bounds` at one order (the base curve itself when q = 1)."""
    if q == 1.0:
        return float(rdp_at[order])
    return float(subsampled_rdp_upper_bounds(q, rdp_at, np.array([order]))[0])


def rdp_integer_mechanism(curve: Curve, q: float, orders: Sequence[float]) -> FloatArray:
    """RDP at ``orders`` of a mechanism known at integer orders through the vectorised
    ``curve``, Poisson subsampled with rate ``q`` (Zhu-Wang bound, capped by the unsampled
    value). A fractional order gets the value at its ceiling: RDP is non-decreasing in the
    order."""
    grid = np.asarray(orders, dtype=np.float64)
    if q == 0:
        return np.zeros_like(grid)
    ceil_orders = np.maximum(np.ceil(grid).astype(np.int64), 2)
    top = int(ceil_orders.max())
    at = np.full(top + 1, np.inf)
    at[2:] = curve(np.arange(2, top + 1, dtype=np.float64))
    if q == 1:
        return at[ceil_orders]
    unique, position = np.unique(ceil_orders, return_inverse=True)
    bound = np.minimum(at[unique], subsampled_rdp_upper_bounds(q, at, unique))
    return np.asarray(bound[position], dtype=np.float64)


def epsilon_from_rdp(
    orders: Sequence[float], rdp: Sequence[float], delta: float
) -> tuple[float, float]:
    """(epsilon, optimal order) from RDP values (Balle et al. 2020, Prop. 12; KL bound)."""
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    if len(orders) != len(rdp):
        raise AccountingError("orders and rdp must have the same length")
    eps: list[float] = []
    for a, r in zip(orders, rdp, strict=True):
        if a < 1:
            raise AccountingError(f"Rényi orders must be at least 1, got {a}")
        if r < 0 or delta**2 + math.expm1(-r) > 0:
            eps.append(0.0)
        elif a > 1.01:
            eps.append(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
        else:
            eps.append(math.inf)
    best = int(np.argmin(eps))
    return max(0.0, eps[best]), float(orders[best])


def delta_from_rdp(
    orders: Sequence[float], rdp: Sequence[float], epsilon: float
) -> tuple[float, float]:
    """(delta, optimal order) for a target epsilon (same bounds as :func:`epsilon_from_rdp`)."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise AccountingError(f"epsilon must be a non-negative number, got {epsilon!r}")
    logdeltas: list[float] = []
    for a, r in zip(orders, rdp, strict=True):
        if r <= 0:
            logdelta = -math.inf
        else:
            logdelta = 0.5 * math.log1p(-math.exp(-r)) if math.isfinite(r) else 0.0
        if a > 1.01 and math.isfinite(r):
            logdelta = min(logdelta, (a - 1) * (r - epsilon + math.log1p(-1 / a)) - math.log(a))
        logdeltas.append(logdelta)
    best = int(np.argmin(logdeltas))
    return min(math.exp(logdeltas[best]), 1.0), float(orders[best])


# --- the accountant --------------------------------------------------------------------------

"""Rényi-DP accountant for the mechanisms fedsec runs: sampled Gaussian, Skellam, distributed
discrete Gaussian, composed over rounds and converted to (epsilon, delta).

Privacy events are frozen dataclasses in the style of Google's ``dp_accounting.DpEvent`` so that
a run report can record exactly what was spent. The accountant is self-contained: it does not
import ``dp_accounting`` (that package is a test dependency only, used to check this module).

Neighbouring relation: add-or-remove one *client* (client-level DP), as in dp_accounting's
``ADD_OR_REMOVE_ONE``; Poisson sampling of clients with rate q each round.

Formulas, and where they come from:

* Sampled Gaussian: Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
  Mechanism" (arXiv:1908.10530), Sec. 3.3: the series for A_alpha, for integer and fractional
  orders. Implemented the same way as ``dp_accounting.rdp.rdp_privacy_accountant`` so the two
  agree to floating-point accuracy (tested to 1e-6 relative).
* Skellam: Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning" (NeurIPS'21), Theorem 3.5 / Corollary 3.6. For a release with symmetric Skellam noise
  of variance mu per coordinate and integer-valued input with L2 and L1 sensitivities D2, D1:
  ``eps(a) <= a*D2^2/(2mu) + min(((2a-1)*D2^2 + 6*D1)/(4mu^2), 3*D1/(2mu))`` for integer
  a > 1. For fractional orders the RDP curve is non-decreasing in the order, so the value at
  ceil(a) is a valid bound.
* Distributed discrete Gaussian: Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian
  Mechanism for Federated Learning with Secure Aggregation" (ICML'21), Theorem 4 / Prop. 14: the
  sum of n independent discrete Gaussians of scale sigma is close in Rényi divergence to one of
  scale sqrt(n)*sigma, with slack tau = 10*sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1)); the
  RDP is ``min(a/2*e2^2 + tau*d, a/2*(e2^2 + 2*e1*tau + tau^2*d), a/2*(e2 + sqrt(d)*tau)^2)``
  with e2 = D2/(sqrt(n) sigma), e1 = D1/(sqrt(n) sigma). This is the formula used by TFF's
  ``distributed_dp`` accounting.
* Subsampling for the non-Gaussian mechanisms: the Mironov et al. series is specific to the
  Gaussian density. For Skellam and the distributed discrete Gaussian we use the general Poisson
  subsampling bound of Zhu and Wang, "Poisson Subsampled Rényi Differential Privacy" (ICML'19),
  Theorem 6, which holds for *any* mechanism given its RDP curve at integer orders 2..a (TFF's
  distributed DP accounting does the same), and take the minimum with the unsampled RDP. Fed
  the Gaussian curve it upper-bounds the Mironov value (a test checks this), so it is the
  conservative counterpart of the bound used for the Gaussian.
* RDP to (epsilon, delta): Balle et al. "Hypothesis testing interpretations and Rényi DP"
  (arXiv:2004.00010, Prop. 12) / Asoodeh et al., plus the KL bound for tiny RDP, exactly as
  ``dp_accounting.rdp.compute_epsilon``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

#: The default order grid of dp_accounting's RdpAccountant.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)

_MAX_STEPS_LOG_A_FRAC = 1000

FloatArray = npt.NDArray[np.float64]


class AccountingError(ValueError):
    """Parameters the accountant cannot account for (out of range, unsupported event)."""


# --- events ----------------------------------------------------------------------------------


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise AccountingError(f"{name} must be a {kind} finite number, got {value!r}")


@dataclass(frozen=True)
class DpEvent:
    """Base of the privacy events; ``to_dict`` gives a JSON-ready record for run reports."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, DpEvent):
                out[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                out[f.name] = [v.to_dict() if isinstance(v, DpEvent) else v for v in value]
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class GaussianDpEvent(DpEvent):
    """Gaussian noise of std ``noise_multiplier`` times the L2 sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_positive("noise_multiplier", self.noise_multiplier, allow_zero=True)


@dataclass(frozen=True)
class SkellamDpEvent(DpEvent):
    """Symmetric Skellam noise on integer vectors, all in integer (scaled) units.

    ``variance`` is the per-coordinate variance of the *total* noise in the released sum;
    ``l2_sensitivity``/``l1_sensitivity`` bound one client's contribution (after rounding).
    """

    l2_sensitivity: float
    l1_sensitivity: float
    variance: float

    def __post_init__(self) -> None:
        _check_positive("l2_sensitivity", self.l2_sensitivity)
        _check_positive("l1_sensitivity", self.l1_sensitivity)
        _check_positive("variance", self.variance)

    @property
    def noise_multiplier(self) -> float:
        """std / L2 sensitivity: the Gaussian-equivalent noise multiplier."""
        return math.sqrt(self.variance) / self.l2_sensitivity


@dataclass(frozen=True)
class DistributedDiscreteGaussianDpEvent(DpEvent):
    """The sum of ``num_clients`` discrete Gaussians of scale ``local_stddev`` (integer units)
    added to integer vectors of dimension ``dim`` with the given sensitivities."""

    l2_sensitivity: float
    l1_sensitivity: float
    local_stddev: float
    num_clients: int
    dim: int

    def __post_init__(self) -> None:
        _check_positive("l2_sensitivity", self.l2_sensitivity)
        _check_positive("l1_sensitivity", self.l1_sensitivity)
        _check_positive("local_stddev", self.local_stddev)
        if self.num_clients < 1 or self.dim < 1:
            raise AccountingError("num_clients and dim must be at least 1")


@dataclass(frozen=True)
class PoissonSampledDpEvent(DpEvent):
    sampling_probability: float
    event: DpEvent

    def __post_init__(self) -> None:
        q = self.sampling_probability
        if not (math.isfinite(q) and 0 <= q <= 1):
            raise AccountingError(f"sampling probability must be in [0, 1], got {q!r}")


@dataclass(frozen=True)
class SelfComposedDpEvent(DpEvent):
    event: DpEvent
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise AccountingError(f"count must be a non-negative integer, got {self.count!r}")


@dataclass(frozen=True)
class ComposedDpEvent(DpEvent):
    events: tuple[DpEvent, ...] = field(default_factory=tuple)


# --- RDP of single mechanisms ----------------------------------------------------------------


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


def skellam_rdp(event: SkellamDpEvent, order: int) -> float:
    """Agarwal et al. (NeurIPS'21) Thm 3.5, integer order > 1, all quantities in integer units."""
    a, mu = order, event.variance
    d2sq, d1 = event.l2_sensitivity**2, event.l1_sensitivity
    return a * d2sq / (2 * mu) + min(((2 * a - 1) * d2sq + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))


def ddgauss_tau(local_stddev: float, num_clients: int) -> float:
    """Kairouz et al. (ICML'21): Rényi slack of summing discrete Gaussians instead of one."""
    ks = np.arange(1, num_clients, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * (math.pi * local_stddev) ** 2 * ks / (ks + 1)).sum())


def ddgauss_rdp(event: DistributedDiscreteGaussianDpEvent, order: int) -> float:
    """Kairouz et al. (ICML'21) Thm 4: RDP of the distributed discrete Gaussian at ``order``."""
    central = math.sqrt(event.num_clients) * event.local_stddev
    e2 = event.l2_sensitivity / central
    e1 = event.l1_sensitivity / central
    tau = ddgauss_tau(event.local_stddev, event.num_clients)
    d = event.dim
    return min(
        order / 2 * e2**2 + tau * d,
        order / 2 * (e2**2 + 2 * e1 * tau + tau**2 * d),
        order / 2 * (e2 + math.sqrt(d) * tau) ** 2,
    )


def subsampled_rdp_upper_bound(q: float, rdp_at: FloatArray, order: int) -> float:
    """Zhu & Wang (ICML'19) Thm 6: RDP at integer ``order`` >= 2 of the Poisson-subsampled
    mechanism, given ``rdp_at[l]`` = RDP of the base mechanism at integer order l (l >= 2)."""
    a = order
    if q == 1.0:
        return float(rdp_at[a])
    log1mq, logq = math.log1p(-q), math.log(q)
    ls = np.arange(3, a + 1, dtype=np.float64)
    log_terms = [
        (a - 1) * log1mq + math.log(a * q - q + 1),
        _log_comb(a, 2) + 2 * logq + (a - 2) * log1mq + rdp_at[2],
    ]
    weights = [1.0, 1.0]
    if a >= 3:
        extra = (
            (ls - 1) * rdp_at[3 : a + 1]
            + special.gammaln(a + 1) - special.gammaln(ls + 1) - special.gammaln(a - ls + 1)
            + (a - ls) * log1mq + ls * logq
        )
        log_terms.extend(extra.tolist())
        weights.extend([3.0] * len(extra))
    return float(special.logsumexp(log_terms, b=weights)) / (a - 1)


def _integer_curve(event: DpEvent, max_order: int) -> FloatArray:
    """RDP of a non-Gaussian base mechanism at integer orders 0..max_order (0 and 1 unused)."""
    curve = np.full(max_order + 1, np.inf)
    for order in range(2, max_order + 1):
        if isinstance(event, SkellamDpEvent):
            curve[order] = skellam_rdp(event, order)
        elif isinstance(event, DistributedDiscreteGaussianDpEvent):
            curve[order] = ddgauss_rdp(event, order)
        else:
            raise AccountingError(f"no integer-order RDP curve for {type(event).__name__}")
    return curve


def _rdp_integer_mechanism(event: DpEvent, q: float, orders: FloatArray) -> FloatArray:
    if q == 0:
        return np.zeros_like(orders)
    ceil_orders = np.maximum(np.ceil(orders).astype(np.int64), 2)
    curve = _integer_curve(event, int(ceil_orders.max()))
    out = np.empty_like(orders)
    cache: dict[int, float] = {}
    for i, a in enumerate(ceil_orders.tolist()):
        if a not in cache:
            plain = float(curve[a])
            cache[a] = plain if q == 1 else min(plain, subsampled_rdp_upper_bound(q, curve, a))
        out[i] = cache[a]
    return out


# --- conversion ------------------------------------------------------------------------------


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


class RdpAccountant:
    """Accumulates RDP over composed events; mirrors dp_accounting's ``RdpAccountant``."""

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        grid = np.array(DEFAULT_RDP_ORDERS if orders is None else orders, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.all(grid > 1):
            raise AccountingError("RDP orders must be a non-empty list of numbers > 1")
        self._orders = grid
        self._rdp = np.zeros_like(grid)
        self._events: list[DpEvent] = []

    @property
    def orders(self) -> FloatArray:
        return self._orders.copy()

    @property
    def rdp(self) -> FloatArray:
        return self._rdp.copy()

    @property
    def ledger(self) -> tuple[DpEvent, ...]:
        """Every event composed so far, in order (for run reports)."""
        return tuple(self._events)

    def compose(self, event: DpEvent, count: int = 1) -> RdpAccountant:
        """Add ``count`` repetitions of ``event``; returns self for chaining."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AccountingError(f"count must be a non-negative integer, got {count!r}")
        self._rdp = self._rdp + self._event_rdp(event, count)
        self._events.append(event if count == 1 else SelfComposedDpEvent(event, count))
        return self

    def _event_rdp(self, event: DpEvent, count: int) -> FloatArray:
        if count == 0:
            return np.zeros_like(self._orders)
        if isinstance(event, SelfComposedDpEvent):
            return self._event_rdp(event.event, event.count * count)
        if isinstance(event, ComposedDpEvent):
            total = np.zeros_like(self._orders)
            for sub in event.events:
                total = total + self._event_rdp(sub, count)
            return total
        q = 1.0
        base = event
        if isinstance(event, PoissonSampledDpEvent):
            q, base = event.sampling_probability, event.event
        if isinstance(base, GaussianDpEvent):
            return count * rdp_sampled_gaussian(q, base.noise_multiplier, self._orders.tolist())
        if isinstance(base, SkellamDpEvent | DistributedDiscreteGaussianDpEvent):
            return count * _rdp_integer_mechanism(base, q, self._orders)
        raise AccountingError(f"unsupported privacy event {type(event).__name__}")

    def get_epsilon_and_optimal_order(self, target_delta: float) -> tuple[float, float]:
        return epsilon_from_rdp(self._orders.tolist(), self._rdp.tolist(), target_delta)

    def get_epsilon(self, target_delta: float) -> float:
        return self.get_epsilon_and_optimal_order(target_delta)[0]

    def get_delta_and_optimal_order(self, target_epsilon: float) -> tuple[float, float]:
        return delta_from_rdp(self._orders.tolist(), self._rdp.tolist(), target_epsilon)

    def get_delta(self, target_epsilon: float) -> float:
        return self.get_delta_and_optimal_order(target_epsilon)[0]


def epsilon_for_rounds(
    event: DpEvent, sampling_rate: float, rounds: int, delta: float,
    orders: Sequence[float] | None = None,
) -> tuple[float, float]:
    """(epsilon, order) of ``rounds`` Poisson-sampled repetitions of ``event``."""
    accountant = RdpAccountant(orders)
    accountant.compose(PoissonSampledDpEvent(sampling_rate, event), rounds)
    return accountant.get_epsilon_and_optimal_order(delta)

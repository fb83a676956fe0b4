"""Rényi-DP accountant for the mechanisms fedsec runs: sampled Gaussian, Skellam, distributed
discrete Gaussian, composed over rounds and converted to (epsilon, delta).

Privacy events are frozen dataclasses in the style of Google's ``dp_accounting.DpEvent`` so that
a run report can record exactly what was spent. It does not import ``dp_accounting`` (a test
dependency only, used to check this module). The per-mechanism formulas live in
:mod:`secagg.dp.rdp`, so the noise calibration (``secagg`` may not import ``proofs``) and this
accountant run the same code.

Neighbouring relation: zero-out one *client* (client-level DP): one institution's clipped
update replaced by zero, everything else (the cohort, the contributor count, every client's
noise) unchanged, which is what the sensitivities of :mod:`secagg.dp.encoder` bound (see
:mod:`secagg.dp.calibration`). :func:`replace_one` gives the event for replacing one
institution's data by any other (two zero-out steps: twice the sensitivity).

Sampling: fedsec's figures are against the server, who knows every cohort, so each release a
client is in is composed at full rate (:func:`composition`). :class:`PoissonSampledDpEvent`
(amplification by subsampling) is for ``fedsec privacy-budget``, a calculator: it holds only
against an observer who cannot see the sampling coins, and only if sampling is Poisson.

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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from secagg.dp.rdp import (
    DEFAULT_RDP_ORDERS,
    AccountingError,
    Curve,
    FloatArray,
    ddgauss_curve,
    ddgauss_rdp,
    ddgauss_tau,
    delta_from_rdp,
    epsilon_from_rdp,
    rdp_integer_mechanism,
    rdp_sampled_gaussian,
    skellam_curve,
    skellam_rdp,
    subsampled_rdp_upper_bound,
)

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "AccountingError",
    "ComposedDpEvent",
    "DistributedDiscreteGaussianDpEvent",
    "DpEvent",
    "GaussianDpEvent",
    "PoissonSampledDpEvent",
    "RdpAccountant",
    "SelfComposedDpEvent",
    "SkellamDpEvent",
    "composition",
    "ddgauss_rdp",
    "ddgauss_tau",
    "delta_from_rdp",
    "epsilon_for_rounds",
    "epsilon_from_rdp",
    "rdp_sampled_gaussian",
    "replace_one",
    "skellam_rdp",
    "subsampled_rdp_upper_bound",
]


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise AccountingError(f"{name} must be a {kind} finite number, got {value!r}")


@dataclass(frozen=True)
class DpEvent:
    """Base of the privacy events; ``to_dict`` gives a JSON-ready record for run reports."""

    def to_dict(self) -> dict[str, Any]:
        """The event's fields, and its class under ``"type"`` (not ``"event"``: that is the
        field of the sampled and self-composed events, which would overwrite it)."""
        out: dict[str, Any] = {"type": type(self).__name__}
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


def composition(events: Sequence[DpEvent]) -> DpEvent:
    """One event for all of ``events`` composed (each at full rate), equal events grouped as
    :class:`SelfComposedDpEvent` in order of first appearance (RDP composition commutes)."""
    counts: dict[DpEvent, int] = {}
    for event in events:
        counts[event] = counts.get(event, 0) + 1
    parts = tuple(e if n == 1 else SelfComposedDpEvent(e, n) for e, n in counts.items())
    if len(parts) == 1:
        return parts[0]
    return ComposedDpEvent(parts)


def replace_one(event: DpEvent) -> DpEvent:
    """The event of ``event``'s mechanism for the replace-one relation, given that ``event`` is
    accounted for zero-out: swapping one client's clipped update for another changes the sum
    by the difference of two, at most twice the sensitivity (two zero-out steps). Subsampled
    events are refused: amplification under replace-one needs its own bound."""
    if isinstance(event, GaussianDpEvent):
        return GaussianDpEvent(event.noise_multiplier / 2)
    if isinstance(event, SkellamDpEvent):
        return SkellamDpEvent(2 * event.l2_sensitivity, 2 * event.l1_sensitivity, event.variance)
    if isinstance(event, DistributedDiscreteGaussianDpEvent):
        return dataclasses.replace(
            event, l2_sensitivity=2 * event.l2_sensitivity, l1_sensitivity=2 * event.l1_sensitivity
        )
    if isinstance(event, SelfComposedDpEvent):
        return SelfComposedDpEvent(replace_one(event.event), event.count)
    if isinstance(event, ComposedDpEvent):
        return ComposedDpEvent(tuple(replace_one(e) for e in event.events))
    raise AccountingError(f"no replace-one counterpart for {type(event).__name__}")


# --- RDP of single mechanisms ----------------------------------------------------------------


def _curve(event: DpEvent) -> Curve:
    if isinstance(event, SkellamDpEvent):
        return skellam_curve(event.l2_sensitivity, event.l1_sensitivity, event.variance)
    if isinstance(event, DistributedDiscreteGaussianDpEvent):
        return ddgauss_curve(
            event.l2_sensitivity,
            event.l1_sensitivity,
            event.local_stddev,
            event.num_clients,
            event.dim,
        )
    raise AccountingError(f"no integer-order RDP curve for {type(event).__name__}")


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
            return count * rdp_integer_mechanism(_curve(base), q, self._orders.tolist())
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
    event: DpEvent,
    sampling_rate: float,
    rounds: int,
    delta: float,
    orders: Sequence[float] | None = None,
) -> tuple[float, float]:
    """(epsilon, order) of ``rounds`` Poisson-sampled repetitions of ``event``."""
    accountant = RdpAccountant(orders)
    accountant.compose(PoissonSampledDpEvent(sampling_rate, event), rounds)
    return accountant.get_epsilon_and_optimal_order(delta)

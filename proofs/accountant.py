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
from collections.abc import Sequence

import numpy as np

from secagg.dp.events import (
    ComposedDpEvent,
    DistributedDiscreteGaussianDpEvent,
    DpEvent,
    GaussianDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
    SkellamDpEvent,
)
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

"""The accountant against Google's dp-accounting (Gaussian) and against the closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from proofs.accountant import (
    DEFAULT_RDP_ORDERS,
    AccountingError,
    ComposedDpEvent,
    DistributedDiscreteGaussianDpEvent,
    GaussianDpEvent,
    PoissonSampledDpEvent,
    RdpAccountant,
    SelfComposedDpEvent,
    SkellamDpEvent,
    composition,
    epsilon_for_rounds,
    rdp_sampled_gaussian,
    replace_one,
    skellam_rdp,
    subsampled_rdp_upper_bound,
)

dp_accounting = pytest.importorskip("dp_accounting")


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta"),
    [
        (0.01, 1.1, 1000, 1e-5),
        (0.1, 0.8, 100, 1e-6),
        (0.003, 2.5, 10_000, 1e-5),
        (1.0, 3.0, 50, 1e-5),
        (0.5, 0.6, 3, 1e-3),
    ],
)
def test_sampled_gaussian_matches_dp_accounting(
    q: float, z: float, rounds: int, delta: float
) -> None:
    theirs = dp_accounting.rdp.RdpAccountant()
    theirs.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    their_eps, their_order = theirs.get_epsilon_and_optimal_order(delta)
    ours = RdpAccountant().compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)
    eps, order = ours.get_epsilon_and_optimal_order(delta)
    assert eps == pytest.approx(their_eps, rel=1e-6)
    assert order == their_order
    np.testing.assert_allclose(ours.rdp, theirs._rdp, rtol=1e-9)
    assert tuple(ours.orders) == tuple(float(o) for o in DEFAULT_RDP_ORDERS)
    their_delta = theirs.get_delta(eps)
    assert ours.get_delta(eps) == pytest.approx(their_delta, rel=1e-6)


def test_composition_and_ledger() -> None:
    event = PoissonSampledDpEvent(0.05, GaussianDpEvent(1.0))
    once = RdpAccountant().compose(event, 10)
    split = RdpAccountant().compose(event, 4).compose(ComposedDpEvent((event,) * 6))
    np.testing.assert_allclose(once.rdp, split.rdp)
    assert once.ledger[0].to_dict()["count"] == 10
    assert once.ledger[0].to_dict()["event"]["event"]["noise_multiplier"] == 1.0
    assert once.ledger[0].to_dict()["type"] == "SelfComposedDpEvent"
    assert once.ledger[0].to_dict()["event"]["type"] == "PoissonSampledDpEvent"


def test_skellam_approaches_gaussian_for_large_variance() -> None:
    # With the variance large against the sensitivities, the discretisation surcharge vanishes.
    z = 1.0
    l2 = 1e4
    event = SkellamDpEvent(l2, l2 * 1000.0, (z * l2) ** 2)
    for order in (2, 10, 64):
        gauss = order / (2 * z**2)
        assert (
            gauss
            < skellam_rdp(event.l2_sensitivity, event.l1_sensitivity, event.variance, order)
            < gauss * (1 + 1e-3)
        )
    eps_sk, _ = epsilon_for_rounds(event, 0.01, 1000, 1e-5)
    eps_g, _ = epsilon_for_rounds(GaussianDpEvent(z), 0.01, 1000, 1e-5)
    # Zhu-Wang is looser than the exact sampled-Gaussian series, but not by much.
    assert eps_g < eps_sk < 1.5 * eps_g


def test_zhu_wang_bound_dominates_exact_sampled_gaussian() -> None:
    z, q = 1.2, 0.02
    curve = np.array([math.inf, math.inf] + [a / (2 * z**2) for a in range(2, 65)])
    exact = rdp_sampled_gaussian(q, z, list(range(2, 65)))
    bound = [subsampled_rdp_upper_bound(q, curve, a) for a in range(2, 65)]
    assert np.all(np.asarray(bound) >= exact * (1 - 1e-12))
    assert bound[0] < 2 * exact[0]


def test_ddgauss_large_scale_is_gaussian() -> None:
    l2, sigma, n = 1000.0, 400.0, 100
    event = DistributedDiscreteGaussianDpEvent(l2, l2 * 30, sigma, n, 1000)
    eps, _ = epsilon_for_rounds(event, 1.0, 1, 1e-5)
    eps_g, _ = epsilon_for_rounds(GaussianDpEvent(sigma * math.sqrt(n) / l2), 1.0, 1, 1e-5)
    assert eps == pytest.approx(eps_g, rel=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianDpEvent(-1.0),
        lambda: PoissonSampledDpEvent(1.5, GaussianDpEvent(1.0)),
        lambda: SkellamDpEvent(1.0, 1.0, 0.0),
        lambda: RdpAccountant().get_epsilon(0.0),
        lambda: RdpAccountant().compose(GaussianDpEvent(1.0), -1),
    ],
)
def test_bad_parameters_are_refused(make: object) -> None:
    with pytest.raises(AccountingError):
        make()  # type: ignore[operator]


def test_composition_groups_equal_events_without_changing_the_rdp() -> None:
    a, b = SkellamDpEvent(100.0, 900.0, 4e4), SkellamDpEvent(100.0, 900.0, 5e4)
    events = [a, b, a, a]
    grouped = composition(events)
    assert grouped == ComposedDpEvent((SelfComposedDpEvent(a, 3), b))
    assert composition([a, a]) == SelfComposedDpEvent(a, 2) and composition([b]) == b
    one_by_one = RdpAccountant()
    for event in events:
        one_by_one.compose(event)
    np.testing.assert_allclose(RdpAccountant().compose(grouped).rdp, one_by_one.rdp)


def test_replace_one_is_the_mechanism_at_twice_the_sensitivity() -> None:
    # Swapping one clipped update for another moves the sum by up to twice the clip: the same
    # noise at twice the sensitivity (two zero-out steps).
    skellam = SkellamDpEvent(100.0, 900.0, 4e4)
    assert replace_one(skellam) == SkellamDpEvent(200.0, 1800.0, 4e4)
    assert replace_one(GaussianDpEvent(2.0)) == GaussianDpEvent(1.0)
    ddg = DistributedDiscreteGaussianDpEvent(10.0, 30.0, 5.0, 8, 64)
    assert replace_one(ddg) == DistributedDiscreteGaussianDpEvent(20.0, 60.0, 5.0, 8, 64)
    assert replace_one(SelfComposedDpEvent(skellam, 3)) == SelfComposedDpEvent(
        replace_one(skellam), 3
    )
    zero_out = RdpAccountant().compose(skellam, 10).get_epsilon(1e-5)
    swapped = RdpAccountant().compose(replace_one(skellam), 10).get_epsilon(1e-5)
    assert zero_out < swapped
    with pytest.raises(AccountingError, match="replace-one"):
        replace_one(PoissonSampledDpEvent(0.1, skellam))

"""Strategies act on the released sum only and follow their papers' update rules."""

from __future__ import annotations

import numpy as np
import pytest

from fl_core.errors import AggregationError, NonFiniteUpdateError, StrategyConfigError
from fl_core.strategies import STRATEGIES, AggregateInput, Strategy, build_strategy, reference_sum

DIM = 12
RNG = np.random.default_rng(3)
DELTAS = [RNG.normal(size=DIM).astype(np.float32) for _ in range(3)]
SAMPLES = [10, 30, 60]


def _round(
    s: Strategy, x: np.ndarray, deltas: list[np.ndarray], controls: bool = False
) -> np.ndarray:
    contributions = [
        s.contribution(d, n, np.full(DIM, 0.5, np.float32) if controls else None)
        for d, n in zip(deltas, SAMPLES, strict=True)
    ]
    agg = reference_sum(contributions, [s.client_weight(n) for n in SAMPLES])
    return s.aggregate(x, agg)


def _weighted_mean(deltas: list[np.ndarray]) -> np.ndarray:
    w = np.asarray(SAMPLES, dtype=np.float64)
    total: np.ndarray = np.sum(
        [wi * d.astype(np.float64) for wi, d in zip(w, deltas, strict=True)], 0
    )
    mean: np.ndarray = total / w.sum()
    return mean


def test_fedavg_is_sample_weighted_mean_and_fedprox_sends_mu() -> None:
    x = np.ones(DIM, np.float32)
    for name in ("fedavg", "fedprox"):
        s = build_strategy(name, DIM, {"mu": 0.1} if name == "fedprox" else {})
        np.testing.assert_allclose(_round(s, x, DELTAS), x + _weighted_mean(DELTAS), rtol=1e-6)
    assert build_strategy("fedprox", DIM, {"mu": 0.1}).client_options().prox_mu == 0.1
    assert build_strategy("fedavg", DIM, {"eta_l": 0.5}).client_options().lr == 0.5


def test_reference_sum_is_float64_and_counts() -> None:
    agg = reference_sum([np.full(2, 1e8, np.float32), np.full(2, 1.0, np.float32)], [1.0, 2.0])
    assert agg.contribution_sum.dtype == np.float64
    assert agg.contribution_sum[0] == 1e8 + 1 and agg.weight_sum == 3.0
    assert agg.num_contributors == 2


def test_fedavgm_momentum() -> None:
    s = build_strategy("fedavgm", DIM, {"eta": 0.5, "beta1": 0.9})
    x0 = np.zeros(DIM, np.float32)
    x1 = _round(s, x0, DELTAS)
    second = [d * 2 for d in DELTAS]
    x2 = _round(s, x1, second)
    d1, d2 = _weighted_mean(DELTAS), _weighted_mean(second)
    np.testing.assert_allclose(x1, 0.5 * d1, rtol=1e-5)
    np.testing.assert_allclose(x2, x1 + 0.5 * (0.9 * d1 + d2), rtol=1e-5)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_server_optimizers_follow_reddi_et_al(name: str) -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = build_strategy(name, DIM, {"eta": eta, "beta1": b1, "beta2": b2, "tau": tau})
    x = np.zeros(DIM, np.float64)
    m, v = np.zeros(DIM), np.full(DIM, tau * tau)
    got = np.zeros(DIM, np.float32)
    for r in range(3):
        deltas = [d * (r + 1) for d in DELTAS]
        got = _round(s, got, deltas)
        d = _weighted_mean(deltas)
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + eta * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-7)


def test_scaffold_concatenates_and_updates_control_by_cohort_share() -> None:
    s = build_strategy("scaffold", DIM, {"num_clients": 6, "eta": 1.0})
    assert s.contribution_size() == 2 * DIM and s.client_weight(99) == 1.0
    x = _round(s, np.zeros(DIM, np.float32), DELTAS, controls=True)
    np.testing.assert_allclose(x, np.mean(DELTAS, axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.state_dict()["c"], np.full(DIM, 0.5 * 3 / 6))
    assert s.client_options().server_control is not None
    with pytest.raises(AggregationError, match="control"):
        s.contribution(DELTAS[0], 1)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_roundtrip_continues_identically(name: str) -> None:
    hp = {"num_clients": 3} if name == "scaffold" else {}
    a, b = build_strategy(name, DIM, hp), build_strategy(name, DIM, hp)
    controls = name == "scaffold"
    x = _round(a, np.zeros(DIM, np.float32), DELTAS, controls)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(_round(a, x, DELTAS, controls), _round(b, x, DELTAS, controls))


def test_bad_state_is_refused() -> None:
    s = build_strategy("fedadam", DIM)
    with pytest.raises(StrategyConfigError, match="keys"):
        s.load_state_dict({"m": np.zeros(DIM)})
    with pytest.raises(StrategyConfigError, match="shape"):
        s.load_state_dict({"m": np.zeros(DIM), "v": np.zeros(DIM + 1)})


def test_registry_errors_are_specific() -> None:
    with pytest.raises(StrategyConfigError, match="unknown strategy 'fedsgd'"):
        build_strategy("fedsgd", DIM)
    with pytest.raises(StrategyConfigError, match="no hyper-parameter lr"):
        build_strategy("fedadam", DIM, {"lr": 0.1})
    with pytest.raises(StrategyConfigError, match="needs hyper-parameter num_clients"):
        build_strategy("scaffold", DIM)
    with pytest.raises(StrategyConfigError, match="must be a number"):
        build_strategy("fedadam", DIM, {"eta": "0.1"})
    with pytest.raises(StrategyConfigError, match="beta1"):
        build_strategy("fedadam", DIM, {"beta1": 1.0})
    assert type(build_strategy("FedAdam", DIM)).name == "fedadam"


def test_unusable_aggregates_are_refused() -> None:
    s = build_strategy("fedavg", DIM)
    x = np.zeros(DIM, np.float32)
    with pytest.raises(AggregationError, match="nothing to aggregate"):
        s.aggregate(x, AggregateInput(np.zeros(DIM), 0.0, 0))
    with pytest.raises(NonFiniteUpdateError):
        s.aggregate(x, AggregateInput(np.full(DIM, np.nan), 1.0, 1))
    with pytest.raises(NonFiniteUpdateError):
        s.contribution(np.full(DIM, np.inf, np.float32), 3)

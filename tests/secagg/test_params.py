"""(k, t) for SecAgg+ and t for SecAgg: reference points, failure modes, monotonicity."""

from __future__ import annotations

import math

import pytest

from secagg.errors import ConfigurationError
from secagg.params import (
    NeighbourhoodParams,
    active_threshold,
    classic_threshold,
    max_corrupt_neighbours,
    release_floor,
    secaggplus_params,
)


@pytest.mark.parametrize(
    ("n", "fraction", "k", "t"),
    [
        # DESIGN.md reference points (Google's production parameter finder).
        (100, 0.05, 12, 6),
        (1000, 0.05, 30, 17),
        (10_000, 0.05, 34, 20),
        (1000, 0.33, 286, 150),
    ],
)
def test_reference_points(n: int, fraction: float, k: int, t: int) -> None:
    params = secaggplus_params(n, fraction, fraction, security_bits=40)
    assert (params.k, params.t) == (k, t)
    assert params == NeighbourhoodParams(
        n=n,
        k=k,
        t=t,
        corrupt_fraction=fraction,
        dropout_fraction=fraction,
        security_bits=40,
        correctness_bits=20,
    )


@pytest.mark.parametrize(
    ("n", "corrupt", "dropout", "k", "t"),
    [
        # More of fcp's graph_parameter_finder_test degrees (its thresholds are upper bounds).
        (100, 0.45, 0.45, 92, 46),
        (100, 0.05, 0.33, 28, 6),
        (10_000, 0.05, 0.33, 86, 29),
        (1000, 0.33, 0.05, 78, 60),
    ],
)
def test_more_semi_honest_points(n: int, corrupt: float, dropout: float, k: int, t: int) -> None:
    params = secaggplus_params(n, corrupt, dropout)
    assert params.k == k
    assert params.t <= t


def test_semi_malicious_server_needs_larger_parameters() -> None:
    params = secaggplus_params(1000, 0.33, 0.05, semi_malicious_server=True)
    # The reference finder gives (132, 109); it omits the share of b_u each client keeps of
    # itself, so its t is one short whenever k + t1 is odd: here t must be 110 at k = 132,
    # which fails correctness there, and the search moves on to k = 138.
    assert (params.k, params.t) == (138, 114)
    honest = secaggplus_params(1000, 0.33, 0.05)
    assert params.k > honest.k and params.t > honest.t
    # A lying server must not collect t shares of b_u from both halves of a neighbourhood:
    # 2t > k + t1 + 1, with t1 the largest non-negligible number of corrupt neighbours.
    t1 = max_corrupt_neighbours(1000, params.k, 330, 40)
    assert params.t == active_threshold(params.k, t1)
    assert 2 * params.t > params.k + t1 + 1 >= 2 * (params.t - 1)  # the smallest such t


def _hypergeometric_tail(n: int, marked: int, k: int, at_least: int) -> float:
    total = math.comb(n, k)
    hits = sum(math.comb(marked, a) * math.comb(n - marked, k - a) for a in range(at_least, k + 1))
    return hits / total


def test_result_meets_both_bounds() -> None:
    n = 500
    params = secaggplus_params(n, 0.1, 0.1)
    corrupt, survivors = 50, 450
    # Security: too many corrupt neighbours is negligible (per client, union over n).
    assert _hypergeometric_tail(n, corrupt, params.k, params.t) < 2.0**-41 / n
    # Correctness: fewer than t surviving neighbours is rare.
    below = 1.0 - _hypergeometric_tail(n, survivors, params.k, params.t)
    assert below < 2.0**-20 / n
    # Minimality of t: one less would not be secure.
    assert _hypergeometric_tail(n, corrupt, params.k, params.t - 1) >= 2.0**-41 / n


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2])
def test_monotone_in_n(fraction: float) -> None:
    ks = [secaggplus_params(n, fraction, fraction).k for n in (50, 100, 500, 1000, 5000, 10**5)]
    assert ks == sorted(ks)
    assert all(k % 2 == 0 for k in ks)
    assert ks[-1] < 300  # logarithmic, not linear, in n


def test_monotone_in_fractions() -> None:
    n = 1000
    by_corrupt = [secaggplus_params(n, g, 0.05) for g in (0.0, 0.05, 0.1, 0.2, 0.3)]
    assert [p.k for p in by_corrupt] == sorted(p.k for p in by_corrupt)
    assert [p.t for p in by_corrupt] == sorted(p.t for p in by_corrupt)
    by_dropout = [secaggplus_params(n, 0.05, d).k for d in (0.0, 0.05, 0.1, 0.2, 0.3)]
    assert by_dropout == sorted(by_dropout)


def test_stricter_security_gives_larger_degree() -> None:
    assert secaggplus_params(1000, security_bits=60).k > secaggplus_params(1000).k
    assert secaggplus_params(1000, correctness_bits=40).k >= secaggplus_params(1000).k


def test_small_cohort_without_sparse_graph_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="complete graph"):
        secaggplus_params(10, 0.4, 0.4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 1000, "corrupt_fraction": 0.5, "dropout_fraction": 0.45}, "<= 0.9"),
        ({"n": 1000, "corrupt_fraction": 1.0}, "corrupt_fraction"),
        ({"n": 1000, "dropout_fraction": -0.1}, "dropout_fraction"),
        ({"n": 1000, "dropout_fraction": float("nan")}, "dropout_fraction"),
        ({"n": 1, "corrupt_fraction": 0.1}, "number of clients"),
        ({"n": 1000, "security_bits": 0}, "security_bits"),
        ({"n": 1000, "correctness_bits": 1.5}, "correctness_bits"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        secaggplus_params(**kwargs)  # type: ignore[arg-type]


def test_semi_malicious_feasibility_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="2\\*dropout_fraction"):
        secaggplus_params(1000, 0.3, 0.35, semi_malicious_server=True)


def test_classic_threshold_rules() -> None:
    # Active server: t > (n + corrupt)/2; semi-honest: t > corrupt; both need t <= n - dropouts.
    assert classic_threshold(100, 0.2, 0.1) == 61
    assert classic_threshold(100, 0.2, 0.1, active_server=False) == 21
    assert classic_threshold(10, 0.0, 0.0, active_server=False) == 2
    assert classic_threshold(100, 1 / 3, 1 / 3 - 0.01) == 67


def test_classic_threshold_refuses_crossing_bounds() -> None:
    with pytest.raises(ConfigurationError, match="correctness needs"):
        classic_threshold(100, 0.2, 0.45)
    with pytest.raises(ConfigurationError, match="correctness needs"):
        classic_threshold(100, 0.6, 0.45, active_server=False)


@pytest.mark.parametrize(
    ("n", "t", "fraction", "floor"),
    [
        (4, 3, 0.05, 3),  # one dropout tolerated, as the classic threshold allows
        (128, 7, 0.05, 121),  # SecAgg+: far above the neighbourhood threshold
        (100, 6, 0.07, 93),  # 0.07 * 100 is a hair above 7 in floating point: still 7
        (10, 3, 0.0, 10),  # no dropout tolerated: everyone must contribute
        (10, 8, 0.5, 8),  # never below the Shamir threshold
    ],
)
def test_release_floor(n: int, t: int, fraction: float, floor: int) -> None:
    assert release_floor(n, t, fraction) == floor

"""Skellam / discrete Gaussian samplers: exact tables, stated deviation, empirical law, CSPRNG."""

from __future__ import annotations

import math

import mpmath  # type: ignore[import-untyped]  # present with torch (via sympy)
import numpy as np
import pytest

from secagg.dp.noise import (
    CORE_RELATIVE_ERROR,
    DEVIATION_BOUND,
    FAR_TAIL_PMF,
    FAR_TAIL_RELATIVE_ERROR,
    TAIL_BITS,
    CsprngWords,
    NoiseSpec,
    SamplerDeviation,
    add_noise,
    pmf,
    sample_noise,
    sampler_for,
    support_bound,
    tail_bound,
)
from secagg.errors import ConfigurationError

SPECS = [
    NoiseSpec("skellam", 0.8),
    NoiseSpec("skellam", 3.0),
    NoiseSpec("skellam", 50.0),
    NoiseSpec("discrete_gaussian", 0.8),
    NoiseSpec("discrete_gaussian", 3.0),
    NoiseSpec("discrete_gaussian", 50.0),
]


def _exact_pmf(spec: NoiseSpec, ks: np.ndarray) -> list[mpmath.mpf]:
    mpmath.mp.prec = 200
    if spec.mechanism == "skellam":
        v = mpmath.mpf(spec.variance)
        return [mpmath.besseli(int(k), v) * mpmath.exp(-v) for k in ks]
    s2 = 2 * mpmath.mpf(spec.variance)
    big_k = support_bound(spec) + 60
    norm = mpmath.fsum(mpmath.exp(-(mpmath.mpf(j) ** 2) / s2) for j in range(-big_k, big_k + 1))
    return [mpmath.exp(-(mpmath.mpf(int(k)) ** 2) / s2) / norm for k in ks]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_float_pmf_is_within_the_stated_relative_error(spec: NoiseSpec) -> None:
    k_max = support_bound(spec)
    ks = np.unique(np.linspace(-k_max, k_max, 41).astype(np.int64))
    approx = pmf(spec, ks)
    if spec.mechanism == "discrete_gaussian":
        full = np.arange(-k_max, k_max + 1)
        approx = approx / math.fsum(pmf(spec, full))
    for k, a, exact in zip(ks, approx, _exact_pmf(spec, ks), strict=True):
        if exact > mpmath.mpf(2) ** -1000:
            allowed = CORE_RELATIVE_ERROR if exact >= FAR_TAIL_PMF else FAR_TAIL_RELATIVE_ERROR
            assert abs(mpmath.mpf(float(a)) / exact - 1) <= allowed, k


def test_skellam_pmf_error_at_a_large_variance() -> None:
    # Core atoms out to 5 sigma at sigma = 500 (mpmath's series is fast there).
    mpmath.mp.prec = 120
    variance = 250_000.0
    ks = np.array([0, 500, 1500, 2500])
    approx = pmf(NoiseSpec("skellam", 500.0), ks)
    for k, a in zip(ks, approx, strict=True):
        exact = mpmath.besseli(int(k), variance, maxterms=10**6) * mpmath.exp(-variance)
        assert exact >= FAR_TAIL_PMF
        assert abs(mpmath.mpf(float(a)) / exact - 1) <= CORE_RELATIVE_ERROR, k


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_support_is_the_smallest_with_tail_below_2_to_minus_80(spec: NoiseSpec) -> None:
    k_max = support_bound(spec)
    assert tail_bound(spec, k_max + 1) <= 2.0**-TAIL_BITS < tail_bound(spec, k_max)
    # The Chernoff bound really bounds the tail (checked against the exact tail mass).
    k = max(1, k_max // 3)
    exact_tail = mpmath.fsum(_exact_pmf(spec, np.arange(k, k_max + 40)))
    assert exact_tail <= tail_bound(spec, k)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_alias_table_realises_the_integer_weights_exactly(spec: NoiseSpec) -> None:
    sampler = sampler_for(spec)
    values, weights, capacity = sampler.implemented
    assert sum(weights) == capacity
    # Mass each value gets from the alias table, in units of 2^-64 per bucket.
    unit = 1 << 64
    realised: dict[int, int] = {}
    thresholds = sampler._threshold.tolist()
    aliases = sampler._alias.tolist()
    for bucket, (thr, alias) in enumerate(zip(thresholds, aliases, strict=True)):
        primary = bucket - sampler.support
        if alias == primary:
            realised[primary] = realised.get(primary, 0) + unit
        else:
            realised[primary] = realised.get(primary, 0) + thr
            realised[alias] = realised.get(alias, 0) + unit - thr
    assert {k: w for k, w in realised.items() if w} == {
        int(v): w for v, w in zip(values, weights, strict=True) if w
    }
    # Total variation to the exactly normalised float PMF, in exact integer arithmetic.
    parts = [float(p).as_integer_ratio() for p in pmf(spec, values)]
    common = max(den for _, den in parts)
    nums = [num * (common // den) for num, den in parts]
    total = sum(nums)
    l1_numerator = sum(abs(w * total - n * capacity) for w, n in zip(weights, nums, strict=True))
    tv = l1_numerator / (2 * capacity * total)
    assert tv <= 2 * 2.0**-64  # the quantisation part of tv_additive
    assert sampler.deviation.tail <= DEVIATION_BOUND.tail


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_empirical_law_matches_the_pmf(spec: NoiseSpec) -> None:
    n = 400_000
    x = sample_noise(spec, n)
    assert x.dtype == np.int64 and x.size == n
    values = np.arange(-support_bound(spec), support_bound(spec) + 1)
    p = pmf(spec, values)
    p = p / p.sum()
    mean = float((values * p).sum())
    var = float(((values - mean) ** 2 * p).sum())
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / n)
    # Var of the sample variance ~ (mu4 - var^2)/n.
    mu4 = float(((values - mean) ** 4 * p).sum())
    assert abs(x.var() - var) < 5 * math.sqrt((mu4 - var**2) / n)
    if spec.mechanism == "skellam":
        assert var == pytest.approx(spec.variance, rel=1e-9)
    counts = np.bincount(x - values[0], minlength=values.size) / n
    central = p > 1e-4
    err = np.abs(counts[central] - p[central]) / np.sqrt(p[central] * (1 - p[central]) / n)
    assert err.max() < 5.5


def test_noise_is_not_reproducible_from_numpy_state() -> None:
    spec = NoiseSpec("skellam", 10.0)
    np.random.seed(0)
    first = sample_noise(spec, 1000)
    np.random.seed(0)
    second = sample_noise(spec, 1000)
    assert not np.array_equal(first, second)
    words = CsprngWords()
    assert len(set(words.uint64(1000).tolist())) == 1000


def test_add_noise_accumulates_in_place() -> None:
    spec = NoiseSpec("discrete_gaussian", 2.0)
    acc = np.full(200_003, 1_000, dtype=np.int64)
    out = add_noise(acc, spec)
    assert out is acc
    assert abs(acc.mean() - 1000) < 0.05 and 3.5 < acc.var() < 4.5
    with pytest.raises(ConfigurationError):
        add_noise(np.zeros(4, dtype=np.int32), spec)


def test_deviation_adjustment() -> None:
    dev = SamplerDeviation(tail=1e-30, tv_additive=1e-20, pmf_relative_error=1e-15)
    assert dev.adjust(1.0, 1e-5, 0) == (1.0, 1e-5)
    eps, delta = dev.adjust(1.0, 1e-5, 10**10)
    assert eps == pytest.approx(1.0 + 2e-5)
    assert 1e-5 < delta < 1.0001e-5 + 1e-9


@pytest.mark.parametrize(
    "make",
    [
        lambda: NoiseSpec("laplace", 1.0),  # type: ignore[arg-type]
        lambda: NoiseSpec("skellam", 0.0),
        lambda: NoiseSpec("skellam", 1e6),
        lambda: sample_noise(NoiseSpec("skellam", 1.0), -1),
    ],
)
def test_bad_noise_parameters_are_refused(make: object) -> None:
    with pytest.raises(ConfigurationError):
        make()  # type: ignore[operator]

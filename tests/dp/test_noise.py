"""Skellam / discrete Gaussian samplers: exact tables, stated deviation, empirical law, CSPRNG."""

from __future__ import annotations

import math

import mpmath  # type: ignore[import-untyped]  # present with torch (via sympy)
import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

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


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_word_split_reassembles_the_64_bit_thresholds(spec: NoiseSpec) -> None:
    # The 32-bit word path must decide with exactly the table's 64-bit thresholds.
    sampler = sampler_for(spec)
    coin_bits = sampler.coin_bits
    rest_bits = 64 - coin_bits
    cut = sampler._cut.astype(object)
    rest = sampler._cut_rest.astype(object)
    buckets = np.arange(cut.size)
    assert np.array_equal(cut >> coin_bits, buckets)
    rebuilt = ((cut & ((1 << coin_bits) - 1)) << rest_bits) | rest
    assert np.array_equal(rebuilt, sampler._threshold.astype(object))
    assert all(0 <= int(r) < 1 << rest_bits for r in rest)
    # The value gathered at 2j + [alias] is bucket j's primary value or its alias.
    pairs = sampler._values.reshape(-1, 2)
    assert np.array_equal(pairs[:, 0], buckets - sampler.support)
    assert np.array_equal(pairs[:, 1], sampler._alias)


class ScriptedWords(CsprngWords):
    """Hands out given arrays in order (each ``fill`` takes the next one): drives ties."""

    def __init__(self, *arrays: npt.NDArray[np.unsignedinteger]) -> None:
        super().__init__()
        self._queue = list(arrays)

    def fill(self, out: npt.NDArray[np.unsignedinteger]) -> None:
        nxt = self._queue.pop(0)
        assert nxt.dtype == out.dtype and nxt.size == out.size
        out[:] = nxt


def test_ties_are_decided_by_the_remaining_coin_bits() -> None:
    sampler = sampler_for(NoiseSpec("skellam", 3.0))
    k, coin_bits = sampler.support, sampler.coin_bits
    # A bucket that splits its mass with a different value, with room on both sides of its
    # cut (same bucket) and of its rest (same bit width).
    low_mask, rest_top = (1 << coin_bits) - 1, (1 << (64 - coin_bits)) - 1
    j = next(
        b
        for b in range(sampler._cut.size)
        if sampler._alias[b] != b - k
        and 0 < int(sampler._cut[b]) & low_mask < low_mask
        and 0 < int(sampler._cut_rest[b]) < rest_top
    )
    primary, alias = j - k, int(sampler._alias[j])
    cut, rest = int(sampler._cut[j]), int(sampler._cut_rest[j])
    words = np.array([cut - 1, cut, cut, cut + 1, cut, cut], dtype=np.uint32)
    # Remaining coin bits for the four ties, in order: below, at, above and far below the rest.
    extra = np.array([rest - 1, rest, rest + 1, 0], dtype=np.uint64) << np.uint64(coin_bits)
    out = sampler.sample(words.size, ScriptedWords(words, extra))
    assert out.tolist() == [primary, primary, alias, alias, alias, primary]


@pytest.mark.parametrize(
    "spec",
    [NoiseSpec("skellam", 3.0), NoiseSpec("discrete_gaussian", 50.0), NoiseSpec("skellam", 3686.4)],
    ids=str,
)
def test_chi_square_against_the_implemented_pmf(spec: NoiseSpec) -> None:
    # 3686.4 is the per-client stddev the calibration picks for the embedded federation.
    n = 1_000_000
    x = sample_noise(spec, n)
    values, weights, capacity = sampler_for(spec).implemented
    p = np.array([w / capacity for w in weights])
    counts = np.bincount(x - values[0], minlength=values.size)
    # Cells of consecutive atoms holding >= 20 expected samples each (greedy; the remainder
    # at the far tail joins the last full cell).
    cell = np.empty(values.size, dtype=np.int64)
    index, filled = 0, 0.0
    for atom, mass in enumerate((p * n).tolist()):
        cell[atom] = index
        filled += mass
        if filled >= 20:
            index, filled = index + 1, 0.0
    cell = np.minimum(cell, index - 1)
    expected = np.bincount(cell, weights=p * n)
    observed = np.bincount(cell, weights=counts)
    assert expected.min() >= 20
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, expected.size - 1) > 1e-4


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

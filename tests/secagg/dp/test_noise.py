"""Skellam / discrete Gaussian samplers: exact tables, charged deviation, empirical law, CSPRNG."""

from __future__ import annotations

import math
from decimal import Context, Decimal

import mpmath  # type: ignore[import-untyped]  # present with torch (via sympy)
import numpy as np
import numpy.typing as npt
import pytest
from scipy import special, stats

from secagg.dp.exact_pmf import FIXED_BITS
from secagg.dp.noise import (
    DEVIATION_BOUND,
    TAIL_BITS,
    CsprngWords,
    NoiseSpec,
    SamplerDeviation,
    add_noise,
    pmf_bracket,
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
#: The per-client stddevs calibration picks (1,500 to MAX_STDDEV; 3686.4 for the embedded run).
LARGE = [
    NoiseSpec("skellam", 1500.0),
    NoiseSpec("skellam", 3686.4),
    NoiseSpec("skellam", 4096.0),
    NoiseSpec("discrete_gaussian", 4096.0),
]
#: What the float64 table was charged for its PMF error before it was built from brackets.
OLD_PMF_CHARGE = 2.0**-39
_CTX = Context(prec=80)


def _reference(spec: NoiseSpec, support: int | None = None) -> list[Decimal]:
    """PMF(k), k = 0..K, normalised over [-K, K], at 80 digits, written independently of
    :mod:`secagg.dp.exact_pmf` (plain decimal arithmetic, no intervals): Miller's backward
    recurrence from 2K + 40 for the Skellam, a^(k^2) for the discrete Gaussian."""
    k_max = support_bound(spec) if support is None else support
    v = Decimal(spec.variance)
    half = [Decimal(0)] * (k_max + 1)
    if spec.mechanism == "skellam":
        two_over_v = _CTX.divide(2, v)
        y_next, y = Decimal(0), Decimal(1)
        for k in range(2 * k_max + 40, 0, -1):
            if k <= k_max:
                half[k] = y
            y_next, y = y, _CTX.add(_CTX.multiply(_CTX.multiply(two_over_v, k), y), y_next)
        half[0] = y
    else:
        a = _CTX.exp(_CTX.divide(-1, _CTX.multiply(2, v)))
        a2, t, g = _CTX.multiply(a, a), Decimal(1), a
        for k in range(k_max + 1):
            half[k] = t
            t, g = _CTX.multiply(t, g), _CTX.multiply(g, a2)
    total = _sum(half[1:])
    total = _CTX.add(half[0], _CTX.multiply(2, total))
    return [_CTX.divide(h, total) for h in half]


def _sum(values: list[Decimal]) -> Decimal:
    """A sum at the reference's precision (``sum`` would round to the default 28 digits)."""
    total = Decimal(0)
    for value in values:
        total = _CTX.add(total, value)
    return total


@pytest.mark.parametrize("spec", [*SPECS, NoiseSpec("skellam", 1500.0), LARGE[2]], ids=str)
def test_reference_pmf_agrees_with_mpmath(spec: NoiseSpec) -> None:
    # Both references are only as good as this: checked against mpmath's own functions.
    mpmath.mp.prec = 200
    ref = _reference(spec)
    k_max = len(ref) - 1
    s2 = mpmath.mpf(spec.variance)
    picks = {0, 1, k_max // 3, k_max} if spec.stddev < 100 else {0, 1, 3 * int(spec.stddev)}
    for k in sorted(picks):
        if spec.mechanism == "skellam":
            exact = mpmath.besseli(k, s2) / mpmath.besseli(0, s2)
        else:
            exact = mpmath.exp(-(mpmath.mpf(k) ** 2) / (2 * s2))
        ours = mpmath.mpf(str(ref[k])) / mpmath.mpf(str(ref[0]))
        assert abs(ours / exact - 1) < mpmath.mpf(2) ** -150, k


@pytest.mark.parametrize("spec", [*SPECS, *LARGE], ids=str)
def test_brackets_contain_the_exact_pmf(spec: NoiseSpec) -> None:
    bracket = pmf_bracket(spec)
    ref = _reference(spec)
    scale = Decimal(1 << FIXED_BITS)
    for k, (lo, hi) in enumerate(zip(bracket.lo, bracket.hi, strict=True)):
        exact = _CTX.multiply(_CTX.divide(ref[k], ref[0]), scale)
        assert lo <= exact <= hi, k
    assert bracket.relative_width() <= DEVIATION_BOUND.pmf_relative_error


@pytest.mark.parametrize("spec", [NoiseSpec("skellam", 1500.0), LARGE[2]], ids=str)
def test_scipy_float_pmf_is_off_by_more_than_the_old_charge(spec: NoiseSpec) -> None:
    # The finding: the float64 PMF the table was built from is off by up to ~6.6e-12 relative
    # on atoms above 2^-50 at the stddevs calibration picks, more than the 2^-39 charged.
    ref = _reference(spec)
    ks = np.arange(len(ref), dtype=np.float64)
    floats = special.ive(ks, spec.variance)
    floats = floats / (floats[0] + 2 * math.fsum(floats[1:]))
    worst = max(
        abs(float(_CTX.divide(Decimal(float(f)), r)) - 1)
        for f, r in zip(floats, ref, strict=True)
        if r >= Decimal(2) ** -50
    )
    assert worst > OLD_PMF_CHARGE


@pytest.mark.parametrize("spec", [*SPECS, *LARGE], ids=str)
def test_the_table_is_within_its_charged_deviation_of_the_exact_pmf(spec: NoiseSpec) -> None:
    # Every atom's weight must be the floor of a PMF within exp(+-eta) of the exact one (eta the
    # sampler's charged pmf_relative_error; the mode also takes the flooring deficit), and the
    # table's total variation from the exact PMF must be within what is charged for it.
    # Built from scipy floats and charged 2^-39, thousands of atoms at stddev >= 1500 failed.
    sampler = sampler_for(spec)
    values, weights, capacity = sampler.implemented
    eta = Decimal(sampler.deviation.pmf_relative_error)
    ref = _reference(spec, sampler.support)
    cap = Decimal(capacity)
    up, down = _CTX.exp(eta), _CTX.exp(-eta)
    outside, l1 = [], Decimal(0)
    for value, weight in zip(values.tolist(), weights, strict=True):
        exact = _CTX.multiply(ref[abs(value)], cap)
        slack = len(weights) if value == 0 else 0
        low = _CTX.subtract(_CTX.multiply(exact, down), 1)
        if not low < weight <= _CTX.add(_CTX.multiply(exact, up), slack):
            outside.append(value)
        l1 = _CTX.add(l1, _CTX.abs(_CTX.subtract(weight, exact)))
    assert outside == [], f"{len(outside)} atoms outside the charged band, e.g. {outside[:5]}"
    tv = _CTX.divide(l1, 2 * cap)
    assert tv <= Decimal(sampler.deviation.tv_additive) + _CTX.subtract(up, 1)
    assert sampler.deviation.pmf_relative_error <= DEVIATION_BOUND.pmf_relative_error
    assert sampler.deviation.tv_additive <= DEVIATION_BOUND.tv_additive


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_support_is_the_smallest_with_tail_below_2_to_minus_80(spec: NoiseSpec) -> None:
    k_max = support_bound(spec)
    assert tail_bound(spec, k_max + 1) <= 2.0**-TAIL_BITS < tail_bound(spec, k_max)
    # The Chernoff bound really bounds the tail (against the exact tail mass, normalised over
    # a support 40 atoms wider: what lies beyond is far below the margin).
    ref = _reference(spec, k_max + 40)
    k = max(1, k_max // 3)
    assert float(_sum(ref[k:])) <= tail_bound(spec, k)
    assert sampler_for(spec).deviation.tail <= DEVIATION_BOUND.tail


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


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_empirical_law_matches_the_pmf(spec: NoiseSpec) -> None:
    n = 400_000
    x = sample_noise(spec, n)
    assert x.dtype == np.int64 and x.size == n
    half = [float(r) for r in _reference(spec)]
    p = np.array([*half[:0:-1], *half])
    values = np.arange(-support_bound(spec), support_bound(spec) + 1)
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

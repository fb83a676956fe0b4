"""Secret integer noise for distributed DP: symmetric Skellam and discrete Gaussian samples.

Randomness: every bit comes from AES-128-CTR keyed with a fresh ``os.urandom(16)`` key per
:class:`CsprngWords` (the OS CSPRNG stretched by a vetted PRF); numpy's RNG is never used.

Sampler: Walker/Vose alias method over the truncated support [-K, K], padded to m = 2^L
buckets. A sample is one 32-bit word: its top L bits pick the bucket, its other 32 - L bits
are the top of a 64-bit primary-or-alias coin, compared with the top of the bucket's 64-bit
threshold; only on equality (probability 2^-(32-L) per sample) are 64 - (32 - L) more coin
bits drawn and compared with the rest of the threshold. That is the same decision as a full
64-bit coin, so the implemented distribution is exactly the table's; all steps are whole-array
numpy operations on cache-sized chunks. The table is built once per distribution (cached)
in *exact integer arithmetic* from rigorous brackets on the PMF (:mod:`secagg.dp.exact_pmf`:
interval arithmetic on 256-bit fixed point, Miller's backward recurrence for the Skellam's
Bessel functions): the lower ends of the brackets are normalised exactly and floored to units
of 2^-64/m, so the implemented distribution is known exactly and is ``W_k / (m 2^64)``.

Deviation from the ideal distribution P (computed for each table, charged by the calibration
through :data:`DEVIATION_BOUND`, which every table is checked against when it is built):

* ``tail``: K is the smallest support with a Chernoff bound on P(|X| > K) below 2^-80 per
  side (Skellam: ``exp(sqrt(v^2+K^2) - v - K asinh(K/v))``; discrete Gaussian, which is
  sigma^2-sub-Gaussian (Canonne, Kamath, Steinke, NeurIPS'20): ``exp(-K^2/(2 sigma^2))``),
  cut further to the atoms whose bracket is above 2^-256 of the mode (only at tiny stddevs);
  charged with a factor 1 + 2^-20 for the float evaluation of the bound.
* ``pmf_relative_error`` (multiplicative, enters epsilon): the normalised lower ends are within
  a factor exp(+-rho) of P restricted to [-K, K] and renormalised, with rho the brackets'
  largest relative width (about 2^-167 at stddev 4096). The float64 PMF used before (scipy's
  ``ive``) was off by up to 6.6e-12 relative at the stddevs calibration picks (1,500-4,096),
  more than the 2^-39 charged for it then.
* ``tv_additive`` (total variation, enters delta): the flooring to table units and the deficit
  given to the mode, computed exactly for each table; below 2^-64 (under one unit per atom
  each, at most m atoms).

See :meth:`SamplerDeviation.adjust` for the resulting (epsilon, delta) of the implemented
mechanism.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.dp.exact_pmf import PmfBracket, discrete_gaussian_bracket, skellam_bracket
from secagg.errors import ConfigurationError

Mechanism = Literal["skellam", "discrete_gaussian"]
MECHANISMS: tuple[Mechanism, ...] = ("skellam", "discrete_gaussian")

TAIL_BITS = 80
#: Relative float error allowed for in a Chernoff tail bound: its exponent is computed in
#: float64 with an absolute error below 2^-24 up to stddev 4096 (the sqrt(v^2 + K^2) - v
#: term, both near v = 2^24), which moves exp by a factor below 1 + 2^-23.
_TAIL_ROUNDING = 2.0**-20
#: Largest per-client standard deviation the alias table is built for (2^17 buckets, ~2 MB).
MAX_STDDEV = 4096.0
#: Elements per sampling chunk: its scratch buffers (~0.8 MB) stay in L2.
_CHUNK = 1 << 15
#: Keystream is produced by encrypting zeros, at most this many bytes per cipher call.
_ZERO_BLOCK = 1 << 18
_ZEROS = memoryview(bytes(_ZERO_BLOCK))

IntArray = npt.NDArray[np.int64]


class CsprngWords:
    """Uniform random words from AES-128-CTR under a fresh OS-random key (one keystream)."""

    def __init__(self) -> None:
        self._encryptor = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()

    def fill(self, out: npt.NDArray[np.unsignedinteger]) -> None:
        """Overwrite ``out`` with keystream (encrypting a shared zero block: no memset pass)."""
        raw = out.view(np.uint8)
        if not raw.flags.c_contiguous:
            raise ConfigurationError("random words need a contiguous buffer")
        target = memoryview(raw)  # type: ignore[arg-type]
        for begin in range(0, raw.nbytes, _ZERO_BLOCK):
            piece = target[begin : begin + _ZERO_BLOCK]
            self._encryptor.update_into(_ZEROS[: len(piece)], piece)

    def uint64(self, size: int) -> npt.NDArray[np.uint64]:
        out = np.empty(size, dtype=np.uint64)
        self.fill(out)
        return out

    def uint32(self, size: int) -> npt.NDArray[np.uint32]:
        out = np.empty(size, dtype=np.uint32)
        self.fill(out)
        return out

    def unit_floats(self, size: int) -> npt.NDArray[np.float64]:
        """Uniform floats in [0, 1) with 53-bit resolution."""
        out = (self.uint64(size) >> np.uint64(11)).astype(np.float64)
        out *= 2.0**-53
        return out


@dataclass(frozen=True)
class NoiseSpec:
    """One client's noise: ``mechanism`` with standard deviation ``stddev`` in integer units.

    Skellam: Poisson(v/2) - Poisson(v/2) with v = stddev^2, PMF e^{-v} I_k(v).
    Discrete Gaussian: P(k) proportional to exp(-k^2 / (2 stddev^2)) (its variance is slightly
    below stddev^2; the accountant is written in terms of the scale parameter).
    """

    mechanism: Mechanism
    stddev: float

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigurationError(
                f"noise mechanism must be one of {MECHANISMS}, got {self.mechanism!r}"
            )
        if not (math.isfinite(self.stddev) and 0 < self.stddev <= MAX_STDDEV):
            raise ConfigurationError(
                f"noise stddev must be in (0, {MAX_STDDEV:g}] integer units, got "
                f"{self.stddev!r}: use a smaller encoding scale"
            )

    @property
    def variance(self) -> float:
        return self.stddev**2


def chernoff_tail(mechanism: Mechanism, variance: float, k: float) -> float:
    """Upper bound on P(X >= k), k > 0, for a Skellam of the given variance or a discrete
    Gaussian of scale sqrt(variance) (sub-Gaussian); also valid for sums of independent ones
    (a sum of Skellams is Skellam; a sum of sub-Gaussians is sub-Gaussian, variances add)."""
    if mechanism == "skellam":
        v = variance
        return math.exp(math.sqrt(v * v + k * k) - v - k * math.asinh(k / v))
    return math.exp(-(k * k) / (2 * variance))


def tail_bound(spec: NoiseSpec, k: float) -> float:
    """Upper bound on P(X >= k) for k > 0 (Chernoff)."""
    return chernoff_tail(spec.mechanism, spec.variance, k)


def tail_quantile(mechanism: Mechanism, variance: float, probability: float) -> int:
    """Smallest integer K with ``chernoff_tail(K + 1) <= probability``."""
    hi = 1
    while chernoff_tail(mechanism, variance, hi + 1) > probability:
        hi *= 2
    lo = 0  # invariant: tail(lo + 1) > probability >= tail(hi + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if chernoff_tail(mechanism, variance, mid + 1) > probability:
            lo = mid
        else:
            hi = mid
    return hi


def support_bound(spec: NoiseSpec) -> int:
    """Smallest K with P(X > K) <= 2^-TAIL_BITS by :func:`tail_bound`."""
    return tail_quantile(spec.mechanism, spec.variance, 2.0**-TAIL_BITS)


def pmf_bracket(spec: NoiseSpec) -> PmfBracket:
    """Rigorous brackets on PMF(k) / PMF(0), k = 0..:func:`support_bound` (exact arithmetic)."""
    build = skellam_bracket if spec.mechanism == "skellam" else discrete_gaussian_bracket
    return build(spec.variance, support_bound(spec))


@dataclass(frozen=True)
class SamplerDeviation:
    """How far one sample of the implemented sampler is from the ideal distribution."""

    tail: float  # mass of the ideal distribution outside [-K, K]
    tv_additive: float  # total variation of the table's flooring and mode deficit
    pmf_relative_error: float  # |log| of the table's PMF ratio to P on [-K, K], before flooring

    def adjust(self, epsilon: float, delta: float, samples: int) -> tuple[float, float]:
        """(epsilon, delta) of the implemented mechanism, given those of the ideal one and the
        total number of noise samples drawn (clients x coordinates x rounds).

        With eta = samples*pmf_relative_error, tau = samples*tv_additive and
        t = samples*tail, chaining TV and max-divergence closeness through the ideal
        mechanism gives epsilon' = epsilon + 2 eta and
        delta' = e^eta delta + tau (1 + e^(epsilon + 2 eta)) + e^(epsilon + eta) t.
        """
        eta = samples * self.pmf_relative_error
        tau = samples * self.tv_additive
        t = samples * self.tail
        eps = epsilon + 2 * eta
        return eps, math.exp(eta) * delta + tau * (1 + math.exp(eps)) + math.exp(epsilon + eta) * t


#: What any sampler built here can deviate by (each table's own ``deviation`` is checked to be
#: at most this when it is built): the calibration budgets for it before the noise scale, and
#: so the table, is known.
DEVIATION_BOUND = SamplerDeviation(
    tail=2 * 2.0**-TAIL_BITS * (1 + _TAIL_ROUNDING),
    tv_additive=2.0**-64,
    pmf_relative_error=2.0**-128,
)


class SamplerPrecisionError(ConfigurationError):
    """A table whose computed deviation exceeds :data:`DEVIATION_BOUND` (the calibration's
    budget): refused rather than sampled."""


class AliasSampler:
    """Exact-table alias sampler for one :class:`NoiseSpec` (build with :func:`sampler_for`)."""

    def __init__(self, spec: NoiseSpec) -> None:
        self.spec = spec
        bracket = pmf_bracket(spec)
        # Atoms below 2^-256 of the mode (tiny stddevs only) are left to the tail term.
        k_max = max(k for k, lo in enumerate(bracket.lo) if lo > 0)
        lows = bracket.lo[: k_max + 1]
        atoms = 2 * k_max + 1
        bits = max((atoms - 1).bit_length(), 1)
        buckets = 1 << bits
        values = np.arange(-k_max, k_max + 1, dtype=np.int64)
        mirrored = [*lows[:0:-1], *lows]
        weights, quantisation = self._integer_weights(mirrored, buckets)
        threshold, alias = _vose(weights, buckets)
        self.support = k_max
        self._bits = bits
        self._threshold = np.array(threshold, dtype=np.uint64)
        self._alias = np.array(alias, dtype=np.int32) - np.int32(k_max)
        # The 64-bit threshold split for 32-bit words: the top coin_bits go, under the bucket
        # number, into one uint32 compared with the whole word; the rest breaks ties.
        self.coin_bits = 32 - bits
        rest_bits = np.uint64(64 - self.coin_bits)
        self._cut = (
            (np.arange(buckets, dtype=np.uint64) << np.uint64(self.coin_bits))
            | (self._threshold >> rest_bits)
        ).astype(np.uint32)
        self._cut_rest = self._threshold & ((np.uint64(1) << rest_bits) - np.uint64(1))
        # Row 2j + 0: primary value of bucket j (j - K); row 2j + 1: its alias value. One
        # gather at index 2j + [alias] then replaces a gather, a subtract and a masked copy;
        # int32 halves the table (1 MB at 2^17 buckets) so it competes less for L2.
        self._values = np.stack(
            [np.arange(-k_max, buckets - k_max, dtype=np.int32), self._alias], axis=1
        ).reshape(-1)
        self.deviation = SamplerDeviation(
            tail=math.nextafter(2 * tail_bound(spec, k_max + 1) * (1 + _TAIL_ROUNDING), math.inf),
            tv_additive=quantisation,
            pmf_relative_error=PmfBracket(lows, bracket.hi[: k_max + 1]).relative_width(),
        )
        bound = DEVIATION_BOUND
        if (
            self.deviation.tail > bound.tail
            or self.deviation.tv_additive > bound.tv_additive
            or self.deviation.pmf_relative_error > bound.pmf_relative_error
        ):
            raise SamplerPrecisionError(
                f"the {spec.mechanism} table for stddev {spec.stddev!r} deviates by "
                f"{self.deviation}, more than the calibration's budget {bound}"
            )
        # The exact implemented probabilities, kept for tests and audits.
        self.implemented = (values, weights[:atoms], buckets << 64)

    @staticmethod
    def _integer_weights(lows: list[int], buckets: int) -> tuple[list[int], float]:
        """Floor of the exactly normalised ``lows`` in units of 2^-64/buckets, the deficit
        given to the mode (the middle atom); and the exact total variation distance from the
        normalised ``lows`` to that table, rounded up to a float."""
        capacity = buckets << 64
        total = sum(lows)
        weights = [low * capacity // total for low in lows]
        weights[len(lows) // 2] += capacity - sum(weights)
        l1 = sum(abs(w * total - low * capacity) for w, low in zip(weights, lows, strict=True))
        tv = Fraction(l1, 2 * capacity * total)
        return weights + [0] * (buckets - len(weights)), math.nextafter(float(tv), math.inf)

    def add_into(self, acc: IntArray, words: CsprngWords | None = None) -> IntArray:
        """``acc += noise`` in place, one independent sample per element; returns ``acc``.

        One 32-bit word per sample: its top ``bits`` pick the bucket, its low ``coin_bits``
        are the top of the bucket's 64-bit coin, compared with the top of the threshold in the
        same unsigned comparison (``_cut``). Only when they are equal (a tie, probability
        2^-coin_bits) does the rest of the coin matter; those few samples draw 64 more bits and
        are decided against the rest of the threshold (:meth:`_break_ties`), so the outcome is
        exactly that of a full 64-bit coin. The value is then one gather at 2j + [alias].
        Works chunk by chunk with reused scratch buffers that stay in cache.
        """
        if acc.ndim != 1 or acc.dtype != np.int64 or not acc.flags.c_contiguous:
            raise ConfigurationError("noise accumulator must be a contiguous 1-D int64 array")
        rng = CsprngWords() if words is None else words
        chunk = min(_CHUNK, acc.size)
        word = np.empty(chunk, dtype=np.uint32)
        bucket = np.empty(chunk, dtype=np.intp)
        cut = np.empty(chunk, dtype=np.uint32)
        value = np.empty(chunk, dtype=self._values.dtype)
        high = np.empty(chunk, dtype=np.bool_)
        tie = np.empty(chunk, dtype=np.bool_)
        shift = np.uint32(self.coin_bits)
        for start in range(0, acc.size, chunk):
            n = min(chunk, acc.size - start)
            w, b, k, v, hi, t = word[:n], bucket[:n], cut[:n], value[:n], high[:n], tie[:n]
            rng.fill(w)
            np.right_shift(w, shift, out=b, casting="unsafe")
            # Bucket indices are < 2^bits = table length by construction; mode="clip" skips
            # numpy's bounds-error pass without changing results.
            np.take(self._cut, b, out=k, mode="clip")
            np.greater_equal(w, k, out=hi)  # coin at or above the threshold's top: alias...
            np.equal(w, k, out=t)  # ...unless a tie, where the coin's low bits decide
            if t.any():
                self._break_ties(b, hi, np.flatnonzero(t), rng)
            np.add(b, b, out=b)
            np.add(b, hi, out=b)
            np.take(self._values, b, out=v, mode="clip")
            window = acc[start : start + n]
            np.add(window, v, out=window)
        return acc

    def _break_ties(
        self,
        bucket: npt.NDArray[np.intp],
        high: npt.NDArray[np.bool_],
        ties: npt.NDArray[np.intp],
        rng: CsprngWords,
    ) -> None:
        """Decide tied samples with the coin's remaining ``64 - coin_bits`` bits: alias iff
        they are at or above the threshold's remaining bits."""
        rest = rng.uint64(ties.size) >> np.uint64(self.coin_bits)
        high[ties] = rest >= self._cut_rest[bucket[ties]]

    def sample(self, size: int, words: CsprngWords | None = None) -> IntArray:
        """``size`` independent samples as int64."""
        return self.add_into(np.zeros(size, dtype=np.int64), words)


def _vose(weights: list[int], buckets: int) -> tuple[list[int], list[int]]:
    """Vose's alias construction on integers summing to ``buckets * 2^64`` (exact)."""
    unit = 1 << 64
    remaining = list(weights)
    threshold = [unit - 1] * buckets
    alias = list(range(buckets))
    small = [i for i, w in enumerate(remaining) if w < unit]
    large = [i for i, w in enumerate(remaining) if w >= unit]
    while small and large:
        s, g = small.pop(), large[-1]
        threshold[s] = remaining[s]
        alias[s] = g
        remaining[g] -= unit - remaining[s]
        if remaining[g] < unit:
            small.append(large.pop())
    # Whatever is left holds exactly one unit (the integer totals are exact): a full bucket,
    # whose alias is itself, so the threshold value does not matter.
    return threshold, alias


@lru_cache(maxsize=32)
def sampler_for(spec: NoiseSpec) -> AliasSampler:
    return AliasSampler(spec)


def sample_noise(spec: NoiseSpec, size: int, words: CsprngWords | None = None) -> IntArray:
    """``size`` secret noise samples for one client."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigurationError(f"sample size must be a non-negative integer, got {size!r}")
    return sampler_for(spec).sample(size, words)


def add_noise(acc: IntArray, spec: NoiseSpec, words: CsprngWords | None = None) -> IntArray:
    """``acc += noise`` in place (the encoder's path: no extra full-length temporaries)."""
    return sampler_for(spec).add_into(acc, words)

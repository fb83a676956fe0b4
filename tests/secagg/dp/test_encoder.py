"""DP encoder: the decoded noisy sum, clipping, the conditional-rounding bound, ring checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg.dp.encoder import (
    DpEncoder,
    DpParams,
    NonFiniteUpdateError,
    _conditional_round,
    check_no_wrap,
    rounded_l1_bound,
    rounded_l2_bound,
)
from secagg.dp.noise import CsprngWords, NoiseSpec
from secagg.errors import ConfigurationError, EncodingError

SEED = bytes(range(32))


def _params(**overrides: object) -> DpParams:
    base: dict[str, object] = {
        "ring_bits": 32,
        "dim": 3000,
        "clip": 1.0,
        "scale": 4096.0,
        "noise": NoiseSpec("skellam", 40.0),
        "seed": SEED,
        "max_clients": 8,
    }
    base.update(overrides)
    return DpParams(**base)  # type: ignore[arg-type]


def _ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = vectors[0].copy()
    for v in vectors[1:]:
        total += v  # uint32 wraps mod 2^32: the ring sum secure aggregation produces
    return total


@pytest.mark.parametrize("mechanism", ["skellam", "discrete_gaussian"])
def test_decoded_sum_is_the_clipped_sum_plus_the_stated_noise(mechanism: str) -> None:
    params = _params(noise=NoiseSpec(mechanism, 40.0))  # type: ignore[arg-type]
    client, server = DpEncoder(params), DpEncoder(params)  # the server needs public params only
    rng = np.random.default_rng(1)
    updates = [rng.standard_normal(params.dim).astype(np.float32) * 0.01 for _ in range(8)]
    decoded = server.decode_sum(_ring_sum([client.encode(u) for u in updates]), 8)
    assert decoded.dtype == np.float32 and decoded.shape == (params.dim,)
    error = decoded - np.sum(updates, axis=0)
    # Noise std of the sum in update units; rounding adds at most var 1/4 per client.
    expected = math.sqrt(8 * (40.0**2 + 0.25)) / params.scale
    assert abs(float(error.mean())) < 5 * expected / math.sqrt(params.dim)
    assert float(error.std()) == pytest.approx(expected, rel=0.1)


def test_updates_above_the_clip_are_scaled_down() -> None:
    params = _params(noise=NoiseSpec("discrete_gaussian", 0.05))
    encoder = DpEncoder(params)
    big = np.full(params.dim, 1.0, dtype=np.float32)  # norm sqrt(3000) >> clip 1
    decoded = encoder.decode_sum(encoder.encode(big), 1)
    assert encoder.last_stats is not None and encoder.last_stats.clipped
    clipped = big / np.linalg.norm(big)
    # Rounding moves each padded coordinate by < 1 unit, so the error norm is < sqrt(n)/scale.
    assert np.linalg.norm(decoded - clipped) < math.sqrt(params.encoded_dim) / params.scale


@pytest.mark.parametrize(
    ("dtype", "value", "where"),
    [
        (np.float64, 1e200, [0]),  # its squared norm overflows float64
        (np.float64, np.finfo(np.float64).max, slice(None)),  # even its norm overflows
        (np.float32, 3e38, [0]),  # float32's largest values: squared in float64, no overflow
    ],
    ids=["float64-1e200", "float64-max-everywhere", "float32-3e38"],
)
def test_huge_finite_updates_are_clipped_not_zeroed(
    dtype: type[np.floating], value: float, where: object
) -> None:
    params = _params(noise=NoiseSpec("discrete_gaussian", 0.05))
    encoder = DpEncoder(params)
    update = np.zeros(params.dim, dtype=dtype)
    update[where] = value  # type: ignore[index]
    decoded = encoder.decode_sum(encoder.encode(update), 1)
    assert encoder.last_stats is not None and encoder.last_stats.clipped
    direction = (update != 0).astype(np.float64)
    clipped = params.clip * direction / np.linalg.norm(direction)
    assert np.linalg.norm(decoded - clipped) < math.sqrt(params.encoded_dim) / params.scale


def test_negative_sums_wrap_and_decode_correctly() -> None:
    params = _params(noise=NoiseSpec("discrete_gaussian", 0.05), max_clients=3)
    encoder = DpEncoder(params)
    update = np.zeros(params.dim, dtype=np.float32)
    update[::2] = -0.02
    summed = _ring_sum([encoder.encode(update) for _ in range(3)])
    assert summed.max() > 2**31  # negative values live at the top of the ring
    decoded = encoder.decode_sum(summed, 3)
    np.testing.assert_allclose(decoded, 3 * update, atol=3 * 3 * 64 / params.scale)


def test_conditional_rounding_respects_the_computed_bound() -> None:
    n = 4096
    scaled = np.full(n, 0.5)  # worst case for the unconditional rounding's norm
    scaled[0] = 30.0
    bound = rounded_l2_bound(float(np.linalg.norm(scaled)), n)
    words = CsprngWords()
    for _ in range(20):
        rounded, attempts = _conditional_round(scaled, bound, words)
        assert attempts >= 1
        assert math.sqrt(float(np.dot(rounded, rounded))) <= bound
        assert np.all(np.abs(rounded - scaled) < 1)
    with pytest.raises(EncodingError):
        _conditional_round(scaled, 1.0, words)  # impossible bound: reported, not looped on


def test_sensitivity_bounds() -> None:
    # The second branch of the bound wins when the dimension is large against the clip.
    c, d = 1000.0, 10**6
    beta = math.exp(-0.5)
    expected = math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    assert rounded_l2_bound(c, d) == pytest.approx(expected)
    assert rounded_l2_bound(c, d, beta=0) == c + 1000.0
    assert rounded_l1_bound(3.0, 100) == 9.0
    assert rounded_l1_bound(30.0, 100) == 300.0


def test_a_ring_too_small_is_refused_with_the_bits_needed() -> None:
    params = _params(ring_bits=12)
    with pytest.raises(ConfigurationError, match="ring bits"):
        DpEncoder(params)
    assert check_no_wrap(_params()) <= 4096 * 2.0**-40


@pytest.mark.parametrize(
    ("update", "error"),
    [
        (np.zeros((2, 1500), dtype=np.float32), EncodingError),
        (np.zeros(3000, dtype=np.int32), EncodingError),
        (np.zeros(2999, dtype=np.float32), EncodingError),
        (np.array([np.nan] + [0.0] * 2999, dtype=np.float32), NonFiniteUpdateError),
        (np.array([0.0] * 2999 + [np.inf], dtype=np.float64), NonFiniteUpdateError),
        (np.array([-np.inf] + [1e200] * 2999, dtype=np.float64), NonFiniteUpdateError),
    ],
)
def test_bad_updates_are_refused(update: np.ndarray, error: type[Exception]) -> None:
    with pytest.raises(error):
        DpEncoder(_params()).encode(update)


def test_bad_aggregates_and_parameters_are_refused() -> None:
    encoder = DpEncoder(_params())
    good = encoder.encode(np.zeros(3000, dtype=np.float32))
    with pytest.raises(ConfigurationError):
        encoder.decode_sum(good, 9)
    with pytest.raises(EncodingError):
        encoder.decode_sum(good[:100], 1)
    with pytest.raises(ConfigurationError):
        encoder.decode_sum(good.astype(np.uint64), 1)
    with pytest.raises(ConfigurationError):
        _params(seed=b"short")
    with pytest.raises(ConfigurationError):
        _params(clip=-1.0)
    with pytest.raises(ConfigurationError):
        _params(scale=2.0**62)

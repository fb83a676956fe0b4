"""Randomized Hadamard rotation: exact inverse, orthogonal, flattening, stable public signs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy.linalg import hadamard

from secagg.dp.rotation import fwht, padded_dim, rotate, rotation_signs, unrotate
from secagg.errors import ConfigurationError, EncodingError

SEED = bytes(range(16))


def test_signs_are_a_pinned_function_of_the_seed() -> None:
    # Known answer: every machine and numpy version must derive these signs from this seed.
    expected = [1, -1, 1, -1, -1, 1, 1, 1, -1, 1, 1, 1, 1, -1, 1, 1, 1, 1, -1, -1, 1, 1, 1, -1]
    assert rotation_signs(SEED, 24).astype(int).tolist() == expected
    stream = hashlib.shake_256(b"fedsec/dp/rotation-signs/v1\x00" + b"\x00\x00\x00\x10" + SEED)
    bits = np.unpackbits(np.frombuffer(stream.digest(128), np.uint8), bitorder="little")
    np.testing.assert_array_equal(rotation_signs(SEED, 1024), 1.0 - 2.0 * bits)
    assert not np.array_equal(rotation_signs(SEED, 64), rotation_signs(bytes(16), 64))


@pytest.mark.parametrize("n", [1, 2, 8, 256, 1 << 15, 1 << 17])
def test_fwht_matches_the_hadamard_matrix(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.standard_normal(n)
    if n <= 256:
        np.testing.assert_allclose(fwht(values.copy()), hadamard(n) @ values, atol=1e-9)
    else:
        # H·H = n·I
        np.testing.assert_allclose(fwht(fwht(values.copy())) / n, values, atol=1e-9)


@pytest.mark.parametrize("dim", [1, 3, 1000, 1024, 1025, 70_000])
def test_rotation_is_orthogonal_and_exactly_inverted(dim: int) -> None:
    x = np.random.default_rng(dim).standard_normal(dim).astype(np.float32)
    y = rotate(x, SEED)
    assert y.size == padded_dim(dim)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x.astype(np.float64)), rel=1e-12)
    np.testing.assert_allclose(unrotate(y, SEED, dim), x, atol=1e-9)


def test_rotation_flattens_a_spike() -> None:
    x = np.zeros(4096)
    x[17] = 3.0
    y = rotate(x, SEED)
    np.testing.assert_allclose(np.abs(y), 3.0 / 64.0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        rotation_signs(b"short", 8)
    with pytest.raises(EncodingError):
        rotate(np.zeros(0), SEED)
    with pytest.raises(EncodingError):
        unrotate(np.zeros(8), SEED, 9)
    with pytest.raises(ConfigurationError):
        fwht(np.zeros(6))
    with pytest.raises(ConfigurationError):
        padded_dim(0)

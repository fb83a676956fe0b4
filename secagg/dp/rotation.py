"""Randomized Hadamard rotation: flattens an update so no coordinate carries much of its norm.

``rotate(x) = H·D·pad(x) / sqrt(n)`` with n the next power of two >= len(x), D a diagonal of
random signs and H the (symmetric, unnormalised) Walsh-Hadamard matrix, H·H = n·I; the map is
orthogonal, so the exact inverse is ``D·H·y / sqrt(n)`` followed by dropping the padding.
After rotation each coordinate of a vector of norm c is sub-Gaussian with variance proxy
c^2/n (Hoeffding over the signs), which is what lets the DP encoder bound the wrap-around
probability of the noisy modular sum (Kairouz, Liu, Steinke, ICML'21, Sec. 4).

The signs are *public*: every client and the server must derive the same ones from the round's
seed on any machine and numpy version, and the seed must be drawn independently of the updates.
They are therefore taken from SHAKE-256 (domain-separated) of the seed, one bit per coordinate,
never from numpy's RNG, whose streams are not guaranteed stable across versions.

The transform is the in-place butterfly over whole arrays: log2(n) passes, each a reshape to
(blocks, 2, h) and one add/subtract pair; no Python loop over coordinates.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, EncodingError

FloatArray = npt.NDArray[np.float64]

_DOMAIN = b"fedsec/dp/rotation-signs/v1\x00"
MIN_SEED_BYTES = 16


def padded_dim(dim: int) -> int:
    """The power of two the rotation works in (at least 1)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigurationError(f"dimension must be a positive integer, got {dim!r}")
    return 1 << (dim - 1).bit_length()


def rotation_signs(seed: bytes, n: int) -> FloatArray:
    """n public +-1 signs from the round seed (bit i of SHAKE-256 output -> sign i)."""
    if not isinstance(seed, bytes) or len(seed) < MIN_SEED_BYTES:
        raise ConfigurationError(f"rotation seed must be at least {MIN_SEED_BYTES} bytes")
    stream = hashlib.shake_256(_DOMAIN + len(seed).to_bytes(4, "big") + seed).digest((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


#: Levels below this block size run block by block while the block is in L2 cache; only the
#: top levels stream the whole vector through memory (about 1.5x faster at n = 2^20).
_CACHE_BLOCK = 1 << 14


def _butterflies(values: FloatArray, h: int, stop: int, scratch: FloatArray) -> None:
    while h < stop:
        view = values.reshape(-1, 2, h)
        low = scratch[: values.size // 2].reshape(-1, h)
        np.subtract(view[:, 0, :], view[:, 1, :], out=low)
        view[:, 0, :] += view[:, 1, :]
        view[:, 1, :] = low
        h *= 2


def fwht(values: FloatArray) -> FloatArray:
    """Unnormalised Walsh-Hadamard transform of a power-of-two-length vector, in place."""
    n = values.size
    if n == 0 or n & (n - 1):
        raise ConfigurationError(f"Hadamard transform needs a power-of-two length, got {n}")
    scratch = np.empty(max(n // 2, 1), dtype=values.dtype)
    block = min(_CACHE_BLOCK, n)
    for start in range(0, n, block):
        _butterflies(values[start : start + block], 1, block, scratch)
    _butterflies(values, block, n, scratch)
    return values


def rotate(update: npt.NDArray[np.floating], seed: bytes) -> FloatArray:
    """Pad to a power of two and apply H·D/sqrt(n); returns a new float64 vector."""
    if update.ndim != 1 or update.size == 0:
        raise EncodingError("the rotation takes a non-empty one-dimensional vector")
    n = padded_dim(update.size)
    out = np.zeros(n, dtype=np.float64)
    out[: update.size] = update
    out *= rotation_signs(seed, n)
    fwht(out)
    out *= 1.0 / math.sqrt(n)
    return out


def unrotate(rotated: FloatArray, seed: bytes, dim: int) -> FloatArray:
    """Exact inverse of :func:`rotate`: D·H·y/sqrt(n), then drop the padding to ``dim``."""
    n = padded_dim(dim)
    if rotated.ndim != 1 or rotated.size != n:
        raise EncodingError(f"a rotated vector of dimension {dim} has length {n}")
    out = rotated.astype(np.float64, copy=True)
    fwht(out)
    out *= rotation_signs(seed, n) / math.sqrt(n)
    return out[:dim]

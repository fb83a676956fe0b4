"""From float32 updates to ring vectors and back: clip, scale, stochastic rounding.

A client's update Δ (float32, length d) becomes integers q = round_stochastic(s·clip(Δ, ±c)),
which are unbiased (E[q] = s·clip(Δ)) with error below one unit per coordinate. In weighted
mode a client contributes w·Δ and w as coordinate d, so the server can divide the secure sum of
w·Δ by the secure sum of w (FedAvg weighted by sample count) without seeing any single w.

No wrap-around: the sum of ``max_clients`` contributions must stay in the centred range of
Z_{2^b}, i.e. max_clients · (s·c·w_max + 1) < 2^(b−1). :meth:`QuantizationParams.fit` picks
the largest power-of-two scale that satisfies this with one bit of headroom, and the
constructor refuses any configuration that does not, saying what to change.

The rounding coins come from AES-CTR keyed with ``os.urandom`` (:mod:`secagg.prg`): the
rounding noise is correlated with the input, so it is treated as secret like everything else.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, EncodingError
from secagg.prg import expand_into
from secagg.ring import Ring, RingArray

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class QuantizationParams:
    """Public encoding parameters, identical for every client of a round."""

    ring_bits: int
    clip: float
    scale: float
    max_clients: int
    max_weight: int = 1
    weighted: bool = False

    def __post_init__(self) -> None:
        Ring(self.ring_bits)
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be a positive finite number, got {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigurationError(f"scale must be a positive finite number, got {self.scale}")
        if self.max_clients < 1 or self.max_weight < 1:
            raise ConfigurationError("max_clients and max_weight must be at least 1")
        if not self.weighted and self.max_weight != 1:
            raise ConfigurationError("max_weight applies only to weighted encoding")
        worst = self.max_clients * (math.ceil(self.scale * self.clip * self.max_weight) + 1)
        if worst >= 1 << (self.ring_bits - 1):
            need = math.ceil(math.log2(worst + 1)) + 1
            raise ConfigurationError(
                f"the sum of {self.max_clients} clients can reach {worst} units, which wraps a "
                f"{self.ring_bits}-bit ring: use at least {need} ring bits, a smaller scale, "
                "a smaller clip or fewer clients"
            )
        if self.weighted and self.max_clients * self.max_weight >= 1 << (self.ring_bits - 1):
            raise ConfigurationError("the summed weights wrap the ring: lower max_weight")

    @classmethod
    def fit(
        cls,
        ring_bits: int,
        clip: float,
        max_clients: int,
        max_weight: int = 1,
        weighted: bool = False,
    ) -> QuantizationParams:
        """The largest power-of-two scale for which ``max_clients`` sums cannot wrap."""
        budget = (1 << (ring_bits - 2)) // max(max_clients, 1) - 1  # one bit of headroom
        if budget < 1 or clip <= 0:
            raise ConfigurationError(
                f"a {ring_bits}-bit ring cannot hold the sum of {max_clients} clients; "
                "use more ring bits"
            )
        exponent = math.floor(math.log2(budget / (clip * max_weight)))
        return cls(ring_bits, clip, 2.0**exponent, max_clients, max_weight, weighted)

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    def encoded_dim(self, dim: int) -> int:
        return dim + 1 if self.weighted else dim

    @property
    def step(self) -> float:
        """One quantization unit in update units; per-coordinate error of an average < step."""
        return 1.0 / self.scale


@dataclass(frozen=True)
class EncodedUpdate:
    vector: RingArray
    clipped: int  # coordinates that were outside ±clip before clipping


def _uniform_unit(size: int) -> npt.NDArray[np.float64]:
    """CSPRNG uniforms in [0, 1) with 32-bit resolution."""
    words = np.empty(size, dtype=np.uint32)
    expand_into(os.urandom(16), words, Ring(32))
    return words.astype(np.float64) * (1.0 / 2**32)


def encode(update: np.ndarray, params: QuantizationParams, weight: int = 1) -> EncodedUpdate:
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise EncodingError("an update must be a one-dimensional numpy array")
    if update.dtype not in (np.float32, np.float64):
        raise EncodingError(f"an update must be float32 or float64, got {update.dtype}")
    if not np.isfinite(update).all():
        bad = int(np.flatnonzero(~np.isfinite(update))[0])
        raise EncodingError(f"update has a NaN or Inf value (first at index {bad}); refusing it")
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise EncodingError(f"weight must be a positive integer, got {weight!r}")
    if weight > params.max_weight:
        raise EncodingError(f"weight {weight} exceeds the round's max_weight {params.max_weight}")
    if not params.weighted and weight != 1:
        raise EncodingError("this round is unweighted; the weight must be 1")
    values = update.astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(values) > params.clip))
    np.clip(values, -params.clip, params.clip, out=values)
    values *= params.scale * weight
    floor = np.floor(values)
    rounded = floor + (_uniform_unit(values.size) < (values - floor))
    integers = rounded.astype(np.int64)
    if params.weighted:
        integers = np.append(integers, np.int64(weight))
    return EncodedUpdate(params.ring.from_signed(integers), clipped)


@dataclass(frozen=True)
class DecodedSum:
    total: FloatArray  # Σ w·Δ (or Σ Δ when unweighted), float32
    weight: float  # Σ w (the contributor count when unweighted)

    def average(self) -> FloatArray:
        return (self.total / np.float32(self.weight)).astype(np.float32)


def decode_sum(summed: RingArray, params: QuantizationParams, contributors: int) -> DecodedSum:
    """Map the ring sum of ``contributors`` encoded updates back to floats."""
    ring = params.ring
    ring.check(summed, "aggregate")
    if not 1 <= contributors <= params.max_clients:
        raise ConfigurationError(
            f"{contributors} contributors, but the encoding was sized for at most "
            f"{params.max_clients}: the sum may have wrapped"
        )
    signed = ring.to_signed(summed)
    if params.weighted:
        weight = float(signed[-1])
        if weight < contributors:
            raise EncodingError("the summed weight is smaller than the number of contributors")
        signed = signed[:-1]
    else:
        weight = float(contributors)
    return DecodedSum((signed / params.scale).astype(np.float32), weight)

"""The ring Z_{2^b} that secure aggregation computes in, as whole numpy arrays.

Elements are stored in the smallest unsigned dtype that holds b bits (uint32 for b <= 32,
uint64 for b <= 64). Arithmetic is done in the dtype's own wrap-around arithmetic and reduced
with one bitwise AND at the end: reduction mod 2^b commutes with addition and subtraction mod
2^32 or 2^64, so intermediate sums never need reducing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError

MAX_BITS = 64

RingArray = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Ring:
    """Z_{2^bits}, 1 <= bits <= 64."""

    bits: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise ConfigurationError(f"ring bits must be an integer in [1, 64], got {self.bits!r}")

    @property
    def dtype(self) -> np.dtype[np.uint32] | np.dtype[np.uint64]:
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def mask(self) -> int:
        """The AND-mask that reduces a dtype word to Z_{2^bits}."""
        return self.modulus - 1

    def zeros(self, size: int) -> RingArray:
        return np.zeros(size, dtype=self.dtype)

    def reduce(self, values: RingArray) -> RingArray:
        """Reduce in place to [0, 2^bits) and return the same array."""
        if self.bits not in (32, 64):
            np.bitwise_and(values, values.dtype.type(self.mask), out=values)
        return values

    def check(self, values: np.ndarray, what: str = "vector") -> RingArray:
        """Validate that ``values`` is a 1-D vector of this ring (dtype and range)."""
        if values.ndim != 1:
            raise ConfigurationError(f"{what} must be one-dimensional, got shape {values.shape}")
        if values.dtype != self.dtype:
            raise ConfigurationError(f"{what} must have dtype {self.dtype}, got {values.dtype}")
        if self.bits not in (32, 64) and values.size and int(values.max()) > self.mask:
            raise ConfigurationError(f"{what} has elements outside Z_2^{self.bits}")
        return values

    def to_signed(self, values: RingArray) -> npt.NDArray[np.int64]:
        """Centred representatives in [-2^(b-1), 2^(b-1)) as int64.

        For b = 64 the result is the two's-complement reinterpretation of the words.
        """
        if self.bits == 64:
            return values.view(np.int64).copy()
        signed = values.astype(np.int64)
        half = 1 << (self.bits - 1)
        signed[signed >= half] -= self.modulus
        return signed

    def from_signed(self, values: npt.NDArray[np.signedinteger]) -> RingArray:
        """Map signed integers to the ring (values must fit in int64)."""
        words = values.astype(np.int64, copy=False).astype(np.uint64)
        return self.reduce(words if self.bits > 32 else words.astype(np.uint32))

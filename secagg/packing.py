"""Bit-packing of ring vectors for transport: b bits per element, not a whole 32/64-bit word.

Byte-aligned widths (8, 16, 24, ... bits) are a strided copy of the little-endian words; other
widths go through a bit matrix. Unpacking checks the exact length and that the padding bits
are zero, so a malformed payload is an error rather than a silently different vector.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from secagg.errors import MessageFormatError
from secagg.ring import Ring, RingArray


def packed_size(bits: int, dim: int) -> int:
    return (bits * dim + 7) // 8


def pack(values: RingArray, ring: Ring) -> bytes:
    ring.check(values, "vector to pack")
    words = values.astype(values.dtype.newbyteorder("<"), copy=False)
    as_bytes = words.view(np.uint8).reshape(values.size, values.dtype.itemsize)
    if ring.bits % 8 == 0:
        return as_bytes[:, : ring.bits // 8].tobytes()
    bit_matrix = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, : ring.bits]
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, ring: Ring, dim: int) -> RingArray:
    expected = packed_size(ring.bits, dim)
    if len(data) != expected:
        raise MessageFormatError(
            f"packed vector has {len(data)} bytes, expected {expected} for {dim} x {ring.bits} bits"
        )
    itemsize = ring.dtype.itemsize
    out = np.zeros((dim, itemsize), dtype=np.uint8)
    raw = np.frombuffer(data, dtype=np.uint8)
    if ring.bits % 8 == 0:
        out[:, : ring.bits // 8] = raw.reshape(dim, ring.bits // 8)
    else:
        bits = np.unpackbits(raw, bitorder="little")
        if bits[ring.bits * dim :].any():
            raise MessageFormatError("packed vector has non-zero padding bits")
        bit_matrix = np.zeros((dim, itemsize * 8), dtype=np.uint8)
        bit_matrix[:, : ring.bits] = bits[: ring.bits * dim].reshape(dim, ring.bits)
        out = np.packbits(bit_matrix, axis=1, bitorder="little")
    return cast(RingArray, out.reshape(-1).view(ring.dtype.newbyteorder("<")).astype(ring.dtype))

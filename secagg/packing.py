"""Bit-packing of ring vectors for transport: b bits per element, not a whole 32/64-bit word.

Byte-aligned widths (8, 16, 24, ... bits) are a strided copy of the little-endian words; other
widths go through a bit matrix. Unpacking checks the exact length and that the padding bits
are zero, so a malformed payload is an error rather than a silently different vector.

The server adds each masked input to its running sum straight from the packed bytes
(:func:`add_packed`): a full-width ring (32 or 64 bits) is read in place, other widths are
unpacked a bounded chunk at a time, so no second d-element vector is allocated. Element ranges
that start at a multiple of 8 start on a whole byte for every width, which is what lets
:func:`unpack_into` fill one range of a vector (a worker's share, :mod:`server.parallel_unmask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, MessageFormatError
from secagg.ring import Ring, RingArray

#: Elements unpacked per step: a multiple of 8, so every step starts on a whole byte.
CHUNK_ELEMENTS = 1 << 16
#: Element ranges given to :func:`unpack_into` start at a multiple of this.
RANGE_ALIGN = 8


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


def check_packed(data: bytes | memoryview, ring: Ring, dim: int) -> None:
    """Refuse a payload of the wrong length or with non-zero padding bits (before any use)."""
    expected = packed_size(ring.bits, dim)
    if len(data) != expected:
        raise MessageFormatError(
            f"packed vector has {len(data)} bytes, expected {expected} for {dim} x {ring.bits} bits"
        )
    used = ring.bits * dim % 8
    if used and data[-1] >> used:
        raise MessageFormatError("packed vector has non-zero padding bits")


def _chunk(raw: npt.NDArray[np.uint8], ring: Ring, n: int) -> RingArray:
    """``n`` elements from their packed bytes ``raw``, as little-endian words."""
    itemsize = ring.dtype.itemsize
    out = np.zeros((n, itemsize), dtype=np.uint8)
    if ring.bits % 8 == 0:
        out[:, : ring.bits // 8] = raw.reshape(n, ring.bits // 8)
    else:
        bits = np.unpackbits(raw, bitorder="little", count=ring.bits * n)
        bit_matrix = np.zeros((n, itemsize * 8), dtype=np.uint8)
        bit_matrix[:, : ring.bits] = bits.reshape(n, ring.bits)
        out = np.packbits(bit_matrix, axis=1, bitorder="little")
    return cast(RingArray, out.reshape(-1).view(ring.dtype.newbyteorder("<")))


def _walk(
    data: bytes | memoryview, ring: Ring, start: int, count: int
) -> Iterator[tuple[int, RingArray]]:
    """(offset in the range, elements) over elements ``start .. start + count`` of ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if ring.bits == 8 * ring.dtype.itemsize:  # the packed bytes are the words: read in place
        words = raw.view(ring.dtype.newbyteorder("<"))
        yield 0, cast(RingArray, words[start : start + count])
        return
    for offset in range(0, count, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, count - offset)
        first = start + offset
        piece = raw[first * ring.bits // 8 : ((first + n) * ring.bits + 7) // 8]
        yield offset, _chunk(piece, ring, n)


def unpack_into(
    out: RingArray, data: bytes | memoryview, ring: Ring, dim: int, start: int = 0
) -> RingArray:
    """Fill ``out`` with elements ``start .. start + out.size`` of the packed ``dim``-element
    vector ``data`` (checked whole); ``start`` is a multiple of :data:`RANGE_ALIGN`."""
    check_packed(data, ring, dim)
    if out.ndim != 1 or out.dtype != ring.dtype:
        raise ConfigurationError(f"unpacking needs a 1-D {ring.dtype} output")
    if start % RANGE_ALIGN or start < 0 or start + out.size > dim:
        raise ConfigurationError(
            f"element range {start}..{start + out.size} must lie inside the {dim}-element vector "
            f"and start at a multiple of {RANGE_ALIGN}"
        )
    for offset, values in _walk(data, ring, start, out.size):
        np.copyto(out[offset : offset + values.size], values)
    return out


def unpack(data: bytes, ring: Ring, dim: int) -> RingArray:
    return unpack_into(ring.zeros(dim), data, ring, dim)


def add_packed(total: RingArray, data: bytes | memoryview, ring: Ring) -> RingArray:
    """``total += unpack(data)`` in the dtype's wrap-around arithmetic (reduce at the end).

    ``data`` is checked before ``total`` is touched, so a malformed payload changes nothing.
    """
    if total.ndim != 1 or total.dtype != ring.dtype:
        raise ConfigurationError(f"the running sum must be a 1-D {ring.dtype} array")
    check_packed(data, ring, total.size)
    for offset, values in _walk(data, ring, 0, total.size):
        window = total[offset : offset + values.size]
        np.add(window, values, out=window)
    return total

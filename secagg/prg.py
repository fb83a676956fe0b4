"""Mask expansion: AES-128-CTR keystreams written straight into preallocated numpy buffers.

A mask is the AES-128-CTR keystream of a 16-byte key, read as little-endian ring words. For
Z_{2^b} the low b bits of a uniform word are uniform, so no rejection sampling is needed; the
protocol only uses power-of-two rings (``secagg.ring.Ring``) and this module refuses anything
else by construction.

Speed: AES-CTR runs at several GB/s, while a naive "expand the whole mask, then add it" moves
every byte through memory twice more. :func:`accumulate_masks` instead walks the output in
chunks that fit in L2 cache and, per chunk, expands each key's next keystream slice into one
small scratch buffer and adds or subtracts it into the accumulator while both are still hot.
The cipher contexts are kept across chunks, so the keystream continues without re-keying.
Measured with thread CPU time on a 2-core AMD EPYC (d = 10^6, 30 keys), this costs 0.95-1.0x
expanding the same masks into a full-length buffer (:func:`raw_keystream_seconds`, the limit
benchmarks report) and about 1.2x the cache-resident cipher alone: the remainder is the add
itself, which numpy cannot fuse into the cipher. Of 64 KiB to 512 KiB chunks, 128 and 256 KiB
tie; 64 KiB pays more per-call overhead and 512 KiB no longer stays in L2 with its scratch.

The keystream is seekable by AES block counter, so a range of a vector can be (un)masked on its
own (``offset``); that is how the server splits unmasking over processes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from secagg.errors import ConfigurationError
from secagg.ring import Ring, RingArray

KEY_BYTES = 16
BLOCK_BYTES = 16
#: Bytes per chunk: 128 KiB of accumulator plus 128 KiB of scratch stay inside a 2 MiB L2.
CHUNK_BYTES = 1 << 17


def _encryptor(key: bytes, block_offset: int = 0) -> CipherContext:
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"a PRG key is {KEY_BYTES} bytes, got {len(key)}")
    if not 0 <= block_offset < 1 << 128:
        raise ConfigurationError("block offset out of range")
    counter_block = block_offset.to_bytes(BLOCK_BYTES, "big")
    return Cipher(algorithms.AES(key), modes.CTR(counter_block)).encryptor()


def expand_into(key: bytes, out: RingArray, ring: Ring, block_offset: int = 0) -> RingArray:
    """Fill ``out`` with the mask of ``key`` starting at AES block ``block_offset``.

    Seekable: the words of ``out`` starting at element ``i`` equal those produced with
    ``block_offset = i * itemsize / 16`` whenever that is an integer, so a mask can be produced
    chunk by chunk or in parallel pieces.
    """
    if out.ndim != 1 or out.dtype != ring.dtype:
        raise ConfigurationError(f"PRG output buffer must be a 1-D {ring.dtype} array")
    raw = out.view(np.uint8)
    if not raw.flags.c_contiguous or not raw.flags.writeable:
        raise ConfigurationError("PRG output buffer must be a writable contiguous array")
    _encryptor(key, block_offset).update_into(bytes(raw.nbytes), raw.data)
    return ring.reduce(out)


def _seek(key: bytes, element_offset: int, itemsize: int) -> CipherContext:
    """A keystream positioned at element ``element_offset`` of a mask of ``itemsize``-byte words,
    also when that element does not start an AES block (the partial block is discarded)."""
    block, skip = divmod(element_offset * itemsize, BLOCK_BYTES)
    encryptor = _encryptor(key, block)
    if skip:
        encryptor.update(bytes(skip))
    return encryptor


def accumulate_masks(
    acc: RingArray,
    ring: Ring,
    add_keys: Sequence[bytes] = (),
    subtract_keys: Sequence[bytes] = (),
    offset: int = 0,
) -> RingArray:
    """``acc += Σ PRG(add_keys) − Σ PRG(subtract_keys)`` in place, chunk by chunk, mod 2^b.

    ``acc`` holds elements ``offset .. offset + acc.size`` of the masked vector: every key's mask
    is read from that position, so disjoint ranges of one vector can be unmasked separately (in
    parallel, by :mod:`server.parallel_unmask`) with the same result as one call over the whole.
    The result is reduced to the ring at the end.
    """
    if acc.ndim != 1 or acc.dtype != ring.dtype or not acc.flags.c_contiguous:
        raise ConfigurationError(f"accumulator must be a contiguous 1-D {ring.dtype} array")
    if offset < 0:
        raise ConfigurationError(f"mask offset must be >= 0, got {offset}")
    itemsize = acc.dtype.itemsize
    chunk_words = CHUNK_BYTES // itemsize
    # One ufunc per key: the inner loop is two C calls and no branch.
    keys = (*add_keys, *subtract_keys)
    combine: list[np.ufunc] = [np.add] * len(add_keys) + [np.subtract] * len(subtract_keys)
    keyed = list(zip([_seek(k, offset, itemsize) for k in keys], combine, strict=True))
    scratch = bytearray(CHUNK_BYTES)
    zeros = bytes(CHUNK_BYTES)
    scratch_words = np.frombuffer(scratch, dtype=acc.dtype)
    for start in range(0, acc.size, chunk_words):
        window = acc[start : start + chunk_words]
        n = window.size
        source, target = zeros, memoryview(scratch)
        words = scratch_words
        if n < chunk_words:  # the last, partial chunk
            source, target, words = source[: n * itemsize], target[: n * itemsize], words[:n]
        for encryptor, op in keyed:
            encryptor.update_into(source, target)
            op(window, words, out=window)
    return ring.reduce(acc)


def raw_keystream_seconds(keys: Sequence[bytes], dim: int, ring: Ring, offset: int = 0) -> float:
    """Time to expand one mask per key into one reused buffer: the AES-CTR speed limit that
    benchmarks compare masking against (same number of masks, same length, same machine).

    With ``offset``, the masks' elements ``offset .. offset + dim`` (one worker's range)."""
    itemsize = ring.dtype.itemsize
    buf = bytearray(dim * itemsize)
    zeros = bytes(len(buf))
    begin = time.perf_counter()
    for key in keys:
        _seek(key, offset, itemsize).update_into(zeros, buf)
    return time.perf_counter() - begin

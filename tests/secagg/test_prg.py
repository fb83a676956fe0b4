import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from secagg.errors import ConfigurationError
from secagg.prg import accumulate_masks, expand_into
from secagg.ring import Ring

KEY = bytes(range(16))


def _ecb_counter_blocks(key: bytes, first: int, count: int) -> bytes:
    """Independent reference: AES-ECB of the big-endian counter blocks (the CTR definition)."""
    blocks = b"".join((first + i).to_bytes(16, "big") for i in range(count))
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(blocks) + enc.finalize()


def test_known_answer_first_block() -> None:
    # Pinned value: FIPS-197 AES-128 key 000102..0f on the all-zero block (counter 0).
    out = np.empty(4, dtype=np.uint32)
    expand_into(KEY, out, Ring(32))
    assert out.view(np.uint8).tobytes().hex() == "c6a13b37878f5b826f4f8162a1c8d879"


def test_keystream_is_aes_of_counter_blocks_and_seekable() -> None:
    ring = Ring(32)
    full = np.empty(64, dtype=np.uint32)
    expand_into(KEY, full, ring)
    assert full.view(np.uint8).tobytes() == _ecb_counter_blocks(KEY, 0, 16)
    tail = np.empty(60, dtype=np.uint32)
    expand_into(KEY, tail, ring, block_offset=1)
    np.testing.assert_array_equal(tail, full[4:])


def test_small_ring_takes_low_bits() -> None:
    out = np.empty(8, dtype=np.uint32)
    expand_into(KEY, out, Ring(20))
    words = np.frombuffer(_ecb_counter_blocks(KEY, 0, 2), dtype="<u4")
    np.testing.assert_array_equal(out, words & ((1 << 20) - 1))


@pytest.mark.parametrize("bits", [13, 32, 48, 64])
def test_accumulate_equals_expand_then_add(bits: int) -> None:
    ring = Ring(bits)
    rng = np.random.default_rng(0)
    dim = 70_001  # crosses several chunks and ends mid-chunk
    start = ring.reduce(rng.integers(0, 2**62, size=dim, dtype=np.uint64).astype(ring.dtype))
    keys = [bytes([i]) * 16 for i in range(5)]
    expected = start.astype(np.uint64)
    for i, key in enumerate(keys):
        mask = ring.zeros(dim)
        expand_into(key, mask, ring)
        expected = expected + mask if i < 3 else expected - mask
    acc = start.copy()
    accumulate_masks(acc, ring, keys[:3], keys[3:])
    np.testing.assert_array_equal(acc, ring.reduce(expected.astype(ring.dtype)))


@pytest.mark.parametrize("bits", [13, 32, 64])
def test_a_range_at_any_offset_is_that_range_of_the_whole(bits: int) -> None:
    # Seeking by element, also into the middle of an AES block (what a worker process does
    # with its share of the vector).
    ring = Ring(bits)
    dim = 70_001
    keys = [bytes([i + 1]) * 16 for i in range(4)]
    whole = ring.zeros(dim)
    accumulate_masks(whole, ring, keys[:3], keys[3:])
    for start, stop in [(0, 5), (1, 7), (3, dim), (33_333, 66_667), (65_535, 70_000)]:
        part = ring.zeros(stop - start)
        accumulate_masks(part, ring, keys[:3], keys[3:], offset=start)
        np.testing.assert_array_equal(part, whole[start:stop])


def test_add_then_subtract_cancels() -> None:
    ring = Ring(24)
    acc = ring.zeros(1000)
    accumulate_masks(acc, ring, [KEY], [KEY])
    assert not acc.any()


def test_mask_is_uniform_on_the_ring() -> None:
    ring = Ring(16)
    out = ring.zeros(1 << 18)
    expand_into(b"\x42" * 16, out, ring)
    counts = np.bincount(out >> 8, minlength=256)  # top 8 bits
    assert stats.chisquare(counts).pvalue > 1e-4


def test_bad_inputs_refused() -> None:
    ring = Ring(32)
    with pytest.raises(ConfigurationError):
        expand_into(b"short", ring.zeros(4), ring)
    with pytest.raises(ConfigurationError):
        expand_into(KEY, np.zeros(4, dtype=np.uint64), ring)

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.encoding import QuantizationParams, decode_sum, encode
from secagg.errors import ConfigurationError, EncodingError, MessageFormatError
from secagg.packing import CHUNK_ELEMENTS, add_packed, pack, packed_size, unpack, unpack_into
from secagg.ring import Ring


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 64), dim=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_pack_roundtrip_and_size(bits: int, dim: int, seed: int) -> None:
    ring = Ring(bits)
    rng = np.random.default_rng(seed)
    values = ring.reduce(rng.integers(0, 2**63, size=dim, dtype=np.uint64).astype(ring.dtype))
    data = pack(values, ring)
    assert len(data) == packed_size(bits, dim) == (bits * dim + 7) // 8
    np.testing.assert_array_equal(unpack(data, ring, dim), values)


def test_unpack_rejects_wrong_length_and_padding() -> None:
    ring = Ring(13)
    data = pack(ring.zeros(3), ring)
    with pytest.raises(MessageFormatError):
        unpack(data + b"\x00", ring, 3)
    with pytest.raises(MessageFormatError):
        unpack(data[:-1], ring, 3)
    with pytest.raises(MessageFormatError):
        unpack(data[:-1] + b"\x80", ring, 3)  # a bit beyond 39 used bits


@pytest.mark.parametrize("bits", [1, 13, 20, 24, 32, 48, 63, 64])
def test_add_packed_equals_unpack_then_add_across_chunks(bits: int) -> None:
    ring = Ring(bits)
    rng = np.random.default_rng(bits)
    dim = 2 * CHUNK_ELEMENTS + 77  # several unpacking steps, the last one partial
    words = rng.integers(0, 2**63, size=(2, dim), dtype=np.uint64).astype(ring.dtype)
    start, values = words[0], ring.reduce(words[1])  # the running sum is not reduced
    total = start.copy()
    add_packed(total, pack(values, ring), ring)
    np.testing.assert_array_equal(total, start + unpack(pack(values, ring), ring, dim))


@pytest.mark.parametrize("bits", [7, 32, 40])
def test_unpack_into_fills_one_range(bits: int) -> None:
    ring = Ring(bits)
    dim = CHUNK_ELEMENTS + 1001
    values = ring.reduce(np.arange(dim, dtype=np.uint64).astype(ring.dtype) * 2654435761)
    data = pack(values, ring)
    for start, stop in [(0, 3), (8, 8), (16, CHUNK_ELEMENTS + 5), (dim - 9, dim)]:
        start -= start % 8
        part = unpack_into(ring.zeros(stop - start), data, ring, dim, start)
        np.testing.assert_array_equal(part, values[start:stop])
    with pytest.raises(ConfigurationError, match="multiple of 8"):
        unpack_into(ring.zeros(4), data, ring, dim, 4)
    with pytest.raises(ConfigurationError, match="inside"):
        unpack_into(ring.zeros(16), data, ring, dim, dim - dim % 8)


def test_add_packed_refuses_a_malformed_payload_before_adding() -> None:
    ring = Ring(13)
    total = np.arange(3, dtype=np.uint32)
    data = pack(np.array([1, 2, 3], dtype=np.uint32), ring)
    for bad in (data + b"\x00", data[:-1], data[:-1] + b"\x80"):
        with pytest.raises(MessageFormatError):
            add_packed(total, bad, ring)
        np.testing.assert_array_equal(total, np.arange(3))
    full = Ring(32)
    with pytest.raises(MessageFormatError):
        add_packed(total, pack(full.zeros(3), full)[:-1], full)
    np.testing.assert_array_equal(total, np.arange(3))


def test_sum_of_encodings_decodes_to_average_within_step() -> None:
    params = QuantizationParams.fit(24, clip=1.0, max_clients=10)
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.3, 1000).astype(np.float32) for _ in range(10)]
    ring = params.ring
    total = ring.zeros(1000)
    for u in updates:
        total = ring.reduce(total + encode(u, params).vector)
    decoded = decode_sum(total, params, 10).average()
    exact = np.mean([np.clip(u, -1, 1) for u in updates], axis=0)
    assert np.max(np.abs(decoded - exact)) <= params.step


def test_stochastic_rounding_is_unbiased() -> None:
    params = QuantizationParams(16, clip=1.0, scale=4.0, max_clients=1)
    x = np.full(200_000, 0.1, dtype=np.float32)  # 0.4 units: rounds to 0 or 1
    q = params.ring.to_signed(encode(x, params).vector)
    assert set(np.unique(q)) <= {0, 1}
    assert abs(q.mean() - 0.4) < 0.01


def test_weighted_mode_appends_weight() -> None:
    params = QuantizationParams.fit(32, clip=1.0, max_clients=4, max_weight=100, weighted=True)
    ring = params.ring
    a = encode(np.full(5, 0.5, dtype=np.float32), params, weight=30).vector
    b = encode(np.full(5, -0.5, dtype=np.float32), params, weight=10).vector
    assert a.size == params.encoded_dim(5) == 6
    decoded = decode_sum(ring.reduce(a + b), params, 2)
    assert decoded.weight == 40
    np.testing.assert_allclose(decoded.average(), (30 * 0.5 - 10 * 0.5) / 40, atol=params.step)


def test_configuration_that_would_wrap_is_refused_with_reason() -> None:
    with pytest.raises(ConfigurationError, match="ring bits"):
        QuantizationParams(16, clip=1.0, scale=2**12, max_clients=100)
    with pytest.raises(ConfigurationError):
        QuantizationParams.fit(8, clip=1.0, max_clients=1000)


def test_bad_updates_refused() -> None:
    params = QuantizationParams.fit(32, clip=1.0, max_clients=2)
    with pytest.raises(EncodingError, match="NaN"):
        encode(np.array([0.0, np.nan], dtype=np.float32), params)
    with pytest.raises(EncodingError):
        encode(np.zeros((2, 2), dtype=np.float32), params)
    with pytest.raises(EncodingError):
        encode(np.zeros(2, dtype=np.float32), params, weight=2)
    with pytest.raises(ConfigurationError):
        decode_sum(params.ring.zeros(2), params, 3)


def test_clipping_is_counted() -> None:
    params = QuantizationParams.fit(32, clip=1.0, max_clients=2)
    assert encode(np.array([5.0, 0.1, -3.0], dtype=np.float32), params).clipped == 2

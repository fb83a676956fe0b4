import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.errors import InconsistentSharesError, TooFewSurvivors
from secagg.shamir import PRIME, SHARE_BYTES, _check_coefficients, _lagrange_at, reconstruct, split


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    rng = random.Random(1)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_every_secret() -> None:
    assert _is_probable_prime(PRIME)
    assert PRIME > 2**256


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_t_shares_reconstruct(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    secrets_ = [os.urandom(32), os.urandom(32)]
    shares = split(secrets_, t, xs)
    subset = data.draw(st.lists(st.sampled_from(range(n)), min_size=t, max_size=n, unique=True))
    for i, secret in enumerate(secrets_):
        assert reconstruct({xs[j]: shares[i][j] for j in subset}, t) == secret


def test_fewer_than_t_shares_refused() -> None:
    shares = split([os.urandom(32)], 3, [1, 2, 3, 4])[0]
    with pytest.raises(TooFewSurvivors):
        reconstruct({1: shares[0], 2: shares[1]}, 3)


def test_corrupted_share_detected_with_extra_shares() -> None:
    secret = os.urandom(32)
    shares = split([secret], 3, [1, 2, 3, 4, 5])[0]
    received = {x: s for x, s in zip([1, 2, 3, 4, 5], shares, strict=True)}
    bad = bytearray(received[4])
    bad[-1] ^= 1
    received[4] = bytes(bad)
    with pytest.raises(InconsistentSharesError):
        reconstruct(received, 3)


def test_malformed_share_refused() -> None:
    with pytest.raises(InconsistentSharesError):
        reconstruct({1: b"\xff" * SHARE_BYTES, 2: b"\x00" * SHARE_BYTES}, 2)
    with pytest.raises(InconsistentSharesError):
        reconstruct({1: b"\x00" * 5, 2: b"\x00" * SHARE_BYTES}, 2)


@settings(max_examples=40, deadline=None)
@given(
    xs=st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=25, unique=True),
    target=st.integers(0, 2**32),
)
def test_lagrange_coefficients_are_the_textbook_ones(xs: list[int], target: int) -> None:
    expected = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (target - xm) % PRIME
                den = den * (xj - xm) % PRIME
        expected.append(num * pow(den, -1, PRIME) % PRIME)
    assert list(_lagrange_at(tuple(xs), target)) == expected


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_check_coefficients_vanish_exactly_on_consistent_shares(data: st.DataObject) -> None:
    xs = data.draw(st.lists(st.integers(1, 5000), min_size=2, max_size=30, unique=True))
    t = data.draw(st.integers(1, len(xs) - 1))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    poly = [rng.randrange(PRIME) for _ in range(t)]
    ys = [sum(c * x**i for i, c in enumerate(poly)) % PRIME for x in xs]
    check = _check_coefficients(tuple(xs[:t]), tuple(xs[t:]))
    assert sum(c * y for c, y in zip(check, ys, strict=True)) % PRIME == 0
    bad = data.draw(st.integers(0, len(xs) - 1))
    ys[bad] = (ys[bad] + 1) % PRIME
    assert sum(c * y for c, y in zip(check, ys, strict=True)) % PRIME != 0

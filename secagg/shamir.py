"""t-of-n Shamir secret sharing of 32-byte secrets over GF(p), p = 2^256 + 297 (prime).

Share x-coordinates are client ids (>= 1). Several secrets can be shared in one call (a client
shares its masking key and its self-mask seed to the same neighbours), evaluating all
polynomials at each point with Horner's rule. Reconstruction caches the Lagrange coefficients
per set of x-coordinates (the server reconstructs many secrets from the same survivors) and,
given more than t shares, checks that every extra share lies on the interpolated polynomial,
so one corrupted share is detected instead of silently changing the secret. The coefficients
come from barycentric weights computed with exact products of id differences and one batched
inversion: under SecAgg+ every secret has its own set of share holders, so at n = 1000 the
server computes about a thousand such sets per session.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping, Sequence

from secagg.errors import ConfigurationError, InconsistentSharesError, TooFewSurvivors
from secagg.ids import check_client_id

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33  # field elements below 2^257


def split(secret_values: Sequence[bytes], threshold: int, xs: Sequence[int]) -> list[list[bytes]]:
    """Share each secret t-of-n at the points ``xs``; result[i][j] is secret i's share at xs[j]."""
    if not 1 <= threshold <= len(xs):
        raise ConfigurationError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs):
        raise ConfigurationError("share points must be distinct")
    for x in xs:
        check_client_id(x)
    coefficients: list[list[int]] = []
    for value in secret_values:
        if len(value) != SECRET_BYTES:
            raise ConfigurationError(f"a shared secret is {SECRET_BYTES} bytes")
        random_terms = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        coefficients.append([int.from_bytes(value, "big"), *random_terms])
    result: list[list[bytes]] = []
    for coeffs in coefficients:
        row = []
        for x in xs:
            acc = 0
            for c in reversed(coeffs):
                acc = (acc * x + c) % PRIME
            row.append(acc.to_bytes(SHARE_BYTES, "big"))
        result.append(row)
    return result


def _field_element(share: bytes, x: int) -> int:
    if len(share) != SHARE_BYTES:
        raise InconsistentSharesError(f"share from client {x} is not {SHARE_BYTES} bytes")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise InconsistentSharesError(f"share from client {x} is not a field element")
    return value


def _products_without_each(factors: Sequence[int]) -> list[int]:
    """[Π_{k≠j} factors[k] for each j], exactly, with prefix and suffix products (O(t))."""
    prefix = [1]
    for f in factors[:-1]:
        prefix.append(prefix[-1] * f)
    out, suffix = [0] * len(factors), 1
    for j in range(len(factors) - 1, -1, -1):
        out[j] = prefix[j] * suffix
        suffix *= factors[j]
    return out


def _inverses(values: Sequence[int]) -> list[int]:
    """Inverses mod p of non-zero ``values`` with one exponentiation (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for j in range(len(values) - 1, -1, -1):
        out[j] = inverse * prefix[j] % PRIME
        inverse = inverse * values[j] % PRIME
    return out


@functools.lru_cache(maxsize=4096)
def _weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Barycentric weights w_j = 1 / Π_{k≠j} (x_j - x_k) mod p.

    The products are of small integers (differences of client ids), computed exactly and
    inverted together, so a set of t points costs O(t²) small products and one inversion.
    """
    dens = [
        math.prod(map(xj.__sub__, xs[:j])) * math.prod(map(xj.__sub__, xs[j + 1 :])) % PRIME
        for j, xj in enumerate(xs)
    ]
    return tuple(_inverses(dens))


@functools.lru_cache(maxsize=4096)
def _lagrange_at(xs: tuple[int, ...], target: int) -> tuple[int, ...]:
    """Coefficients l_j with f(target) = Σ l_j f(xs[j]) for any polynomial of degree < len(xs):
    l_j = w_j · Π_{k≠j} (target - x_k)."""
    nodes = _products_without_each([target - x for x in xs])
    return tuple(w * node % PRIME for w, node in zip(_weights(xs), nodes, strict=True))


def _interpolate(points: Sequence[tuple[int, int]], target: int) -> int:
    xs = tuple(x for x, _ in points)
    weights = _lagrange_at(xs, target)
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


@functools.lru_cache(maxsize=4096)
def _check_coefficients(basis: tuple[int, ...], extra: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients c with Σ c_i y_i = 0 (over basis then extra points) for every consistent
    share set, and ≠ 0 except with probability 1/p for an inconsistent one.

    It is a random combination (coins from ``secrets``, never seen by clients) of the checks
    "extra share e equals the interpolation of the basis at x_e", so a secret with m shares is
    checked with m multiplications instead of (m - t)·t. The Lagrange values at the extra points
    come from the basis's barycentric weights: O(t) products per extra point and no inversion.
    """
    randomisers = [secrets.randbelow(PRIME - 1) + 1 for _ in extra]
    # c_j = -Σ_e r_e l_j(x_e) = -w_j Σ_e r_e Π_{k≠j} (x_e - x_k): reduced once per j.
    sums = [0] * len(basis)
    for xe, r in zip(extra, randomisers, strict=True):
        for j, node in enumerate(_products_without_each([xe - x for x in basis])):
            sums[j] += r * node
    coefficients = [-w * total % PRIME for w, total in zip(_weights(basis), sums, strict=True)]
    return (*coefficients, *randomisers)


def reconstruct(shares: Mapping[int, bytes], threshold: int, what: str = "secret") -> bytes:
    """Recover a secret from ``shares`` (x -> share bytes), checking any beyond the first t."""
    if len(shares) < threshold:
        raise TooFewSurvivors(f"{what}: {len(shares)} shares, {threshold} needed")
    points = sorted((x, _field_element(s, x)) for x, s in shares.items())
    basis, extra = points[:threshold], points[threshold:]
    if extra:
        check = _check_coefficients(tuple(x for x, _ in basis), tuple(x for x, _ in extra))
        if sum(c * y for c, (_, y) in zip(check, points, strict=True)) % PRIME:
            bad = next(x for x, y in extra if _interpolate(basis, x) != y)
            raise InconsistentSharesError(
                f"{what}: the shares do not lie on one polynomial (checked at client {bad})"
            )
    secret = _interpolate(basis, 0)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise InconsistentSharesError(f"{what}: reconstructed value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")

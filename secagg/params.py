"""Choosing the neighbourhood degree k and Shamir threshold t for SecAgg+ (and t for SecAgg).

SecAgg+ (Bell et al., CCS'20, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead") masks each input only with its k neighbours in a randomly labelled Harary graph and
Shamir-shares its secrets among them with threshold t. The criterion implemented here is the
one of Google's production parameter finder (federated-compute,
``fcp/secagg/server/graph_parameter_finder.cc``), re-derived with exact rational arithmetic
(Python integers and ``math.comb``) instead of floating point, so no rounding can move a
probability to the wrong side of its bound.

With c = floor(gamma*n) corrupt clients, d = floor(delta*n) dropouts and at least
s = ceil((1-delta)*n) survivors, the smallest even k < n-1 is chosen for which some t satisfies

1. connectivity (security): the union bound over the n(n-k-1)/2 pairs of gaps that would cut
   the ring of H_{k,n}, each needing k removed vertices, C(c+d, k)/C(n, k) per pair, is
   < 2^-(sigma+1);
2. secrecy of every neighbourhood (security): for each client, the number A of corrupt
   neighbours, A ~ Hypergeometric(n, c, k), satisfies P[A >= t] < 2^-(sigma+1)/n, so no
   client's secrets can be reconstructed by corrupt parties (union bound over the n clients);
3. correctness: the number S of surviving neighbours, S ~ Hypergeometric(n, s, k), satisfies
   P[S < t] < 2^-eta/n, so every neighbourhood keeps at least t share holders.

t is the smallest value meeting 2 (at least 2, since Shamir with t = 1 is no secret sharing).
The security bound is split over events 1 and 2 (hence sigma+1), so the total probability that
the adversary learns more than the sum of the honest survivors' inputs is < 2^-sigma; the
probability that the round cannot be completed is < 2^-eta.

Assumptions: the graph labels are a uniformly random permutation the server cannot influence
(a public seed fixed after the cohort), corruption is static and independent of the labels, at
most gamma*n clients are corrupt and at most delta*n drop out. With a semi-malicious server
(one that may lie about who dropped out, splitting the honest clients into groups that each
reveal shares), t must also exceed half of the neighbourhood plus the corrupt neighbours:
t1 is then raised to ceil((t1 + k - 1.25) / 2) as in the reference implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from secagg.errors import ConfigurationError

DEFAULT_SECURITY_BITS = 40
DEFAULT_CORRECTNESS_BITS = 20

# A fraction like 0.07 is 0.07000000000000000666...; multiplying by n may land a hair below an
# integer. The tolerance makes floor/ceil round to the count the user meant, in the
# conservative direction, exactly as the reference implementation does.
_TOLERANCE = 1e-14

# The reference finder declares instances infeasible beyond these sums (the search would only
# end at the complete graph); we refuse them up front with a message naming the constraint.
_MAX_SEMI_HONEST_SUM = 0.9
_MAX_SEMI_MALICIOUS_SUM = 0.9


@dataclass(frozen=True)
class NeighbourhoodParams:
    """A (k, t) pair for SecAgg+ over n clients and the threat model it was derived for."""

    n: int
    k: int
    t: int
    corrupt_fraction: float
    dropout_fraction: float
    security_bits: int
    correctness_bits: int
    semi_malicious_server: bool = False


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ConfigurationError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_bits(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 256:
        raise ConfigurationError(f"{name} must be an integer in [1, 256], got {value!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigurationError(f"the number of clients must be an integer >= 2, got {n!r}")


def _corrupt_count(n: int, corrupt_fraction: float) -> int:
    return math.floor((corrupt_fraction + _TOLERANCE) * n)


def _dropout_count(n: int, dropout_fraction: float) -> int:
    return math.floor((dropout_fraction + _TOLERANCE) * n)


def _survivor_count(n: int, dropout_fraction: float) -> int:
    return math.ceil((1.0 - dropout_fraction - _TOLERANCE) * n)


def _hypergeometric_weights(n: int, marked: int, k: int) -> list[int]:
    """w[a] = C(marked, a) * C(n - marked, k - a); P[X = a] = w[a] / C(n, k)."""
    weights = [0] * (k + 1)
    low, high = max(0, k - (n - marked)), min(k, marked)
    weight = math.comb(marked, low) * math.comb(n - marked, k - low)
    for a in range(low, high + 1):
        weights[a] = weight
        # Ratio of consecutive terms; the division is exact because both terms are integers.
        weight = weight * (marked - a) * (k - a) // ((a + 1) * (n - marked - k + a + 1))
    return weights


def _disconnection_is_negligible(n: int, k: int, bad: int, security_bits: int) -> bool:
    """Event 1 above: n(n-k-1)/2 * C(bad, k)/C(n, k) < 2^-(sigma+1), compared exactly."""
    if k > bad:
        return True
    # n(n-k-1)/2 * C(bad,k) * 2^(sigma+1) < C(n,k)  <=>  n(n-k-1) C(bad,k) 2^sigma < C(n,k)
    return n * (n - k - 1) * math.comb(bad, k) << security_bits < math.comb(n, k)


def _threshold_for_degree(
    n: int,
    k: int,
    corrupt: int,
    survivors: int,
    security_bits: int,
    correctness_bits: int,
    semi_malicious_server: bool,
) -> int | None:
    """The smallest secure t for degree k, or None when no t is both secure and correct."""
    total = math.comb(n, k)
    # Security: smallest t with P[A >= t] < 2^-(sigma+1)/n, i.e. tail * n * 2^(sigma+1) < total.
    corrupt_weights = _hypergeometric_weights(n, corrupt, k)
    tail = 0
    t = k + 1
    while t > 0 and (tail + corrupt_weights[t - 1]) * n << (security_bits + 1) < total:
        tail += corrupt_weights[t - 1]
        t -= 1
    t1 = t - 1  # largest number of corrupt neighbours that is not negligible
    if semi_malicious_server:
        # ceil((t1 + k - 1.25) / 2) with integers: 4*t1 + 4*k - 5 over 8, rounded up.
        t1 = -((-(4 * t1 + 4 * k - 5)) // 8)
    threshold = max(t1 + 1, 2)
    if threshold > k:
        return None
    # Correctness: P[S <= threshold - 1] < 2^-eta / n, i.e. head * n * 2^eta < total.
    survivor_weights = _hypergeometric_weights(n, survivors, k)
    head = sum(survivor_weights[:threshold])
    if head * n << correctness_bits >= total:
        return None
    return threshold


@lru_cache(maxsize=256)
def _search(
    n: int,
    corrupt_fraction: float,
    dropout_fraction: float,
    security_bits: int,
    correctness_bits: int,
    semi_malicious_server: bool,
) -> NeighbourhoodParams:
    corrupt = _corrupt_count(n, corrupt_fraction)
    bad = corrupt + _dropout_count(n, dropout_fraction)
    survivors = _survivor_count(n, dropout_fraction)
    for k in range(2, n - 1, 2):
        if not _disconnection_is_negligible(n, k, bad, security_bits):
            continue
        t = _threshold_for_degree(
            n, k, corrupt, survivors, security_bits, correctness_bits, semi_malicious_server
        )
        if t is not None:
            return NeighbourhoodParams(
                n=n,
                k=k,
                t=t,
                corrupt_fraction=corrupt_fraction,
                dropout_fraction=dropout_fraction,
                security_bits=security_bits,
                correctness_bits=correctness_bits,
                semi_malicious_server=semi_malicious_server,
            )
    raise ConfigurationError(
        f"no Harary degree k < n-1 = {n - 1} keeps the honest survivors connected and has a "
        f"threshold that is both secure (2^-{security_bits}) and correct (2^-{correctness_bits})"
        f" for n={n}, corrupt fraction {corrupt_fraction}, dropout fraction {dropout_fraction};"
        " use the complete graph (classic_threshold) or a larger cohort"
    )


def secaggplus_params(
    n: int,
    corrupt_fraction: float = 0.05,
    dropout_fraction: float = 0.05,
    security_bits: int = DEFAULT_SECURITY_BITS,
    correctness_bits: int = DEFAULT_CORRECTNESS_BITS,
    *,
    semi_malicious_server: bool = False,
) -> NeighbourhoodParams:
    """The smallest even Harary degree k and its threshold t for SecAgg+ over n clients.

    Bounds two failure probabilities (see the module docstring for the exact criterion):

    * security, < 2^-security_bits: the adversary (the server plus corrupt_fraction*n static
      corrupt clients) learns more than the sum of the honest survivors, either because
      removing corrupt and dropped clients disconnects the honest graph or because some
      client has >= t corrupt neighbours;
    * correctness, < 2^-correctness_bits: some honest neighbourhood keeps fewer than t
      survivors when dropout_fraction*n clients drop out, so the round cannot finish.

    Assumes uniformly random graph labels (a public seed the server cannot bias), static
    corruption independent of the labels, and at most the stated fractions of corrupt and
    dropped clients. ``semi_malicious_server`` protects against a server that lies about
    dropouts (larger t and k). Raises :class:`ConfigurationError` naming the failed
    constraint when no parameters exist.
    """
    _check_n(n)
    _check_fraction("corrupt_fraction", corrupt_fraction)
    _check_fraction("dropout_fraction", dropout_fraction)
    _check_bits("security_bits", security_bits)
    _check_bits("correctness_bits", correctness_bits)
    if semi_malicious_server:
        if corrupt_fraction + 2 * dropout_fraction > _MAX_SEMI_MALICIOUS_SUM:
            raise ConfigurationError(
                "with a semi-malicious server corrupt_fraction + 2*dropout_fraction must be "
                f"<= {_MAX_SEMI_MALICIOUS_SUM}, got {corrupt_fraction} + 2*{dropout_fraction}"
            )
    elif corrupt_fraction + dropout_fraction > _MAX_SEMI_HONEST_SUM:
        raise ConfigurationError(
            f"corrupt_fraction + dropout_fraction must be <= {_MAX_SEMI_HONEST_SUM}, got "
            f"{corrupt_fraction} + {dropout_fraction}"
        )
    return _search(
        n,
        float(corrupt_fraction),
        float(dropout_fraction),
        security_bits,
        correctness_bits,
        semi_malicious_server,
    )


def classic_threshold(
    n: int,
    corrupt_fraction: float,
    dropout_fraction: float,
    *,
    active_server: bool = True,
) -> int:
    """The smallest Shamir threshold for classic SecAgg (complete graph) over n clients.

    Rule (Bonawitz et al., CCS'17), with c = floor(corrupt_fraction*n) corrupt clients and
    d = floor(dropout_fraction*n) dropouts:

    * semi-honest server: t > c, so the corrupt clients' shares alone never reconstruct an
      honest client's secrets;
    * active server (``active_server=True``, the default because the server is the party we
      do not trust): the server can tell disjoint groups of honest clients different dropout
      stories and collect the self-mask shares of a client from one group and its key shares
      from the other. Each group holds at least t - c honest shares, so two groups are
      impossible iff 2(t - c) > n - c, i.e. t > (n + c) / 2;
    * correctness: the n - d survivors must still hold t shares, t <= n - d.

    The bound is deterministic (no probability): the complete graph has no randomness to
    exploit. The smallest admissible t is returned because it tolerates the most dropouts.
    Raises :class:`ConfigurationError` when the security and correctness bounds cross.
    """
    _check_n(n)
    _check_fraction("corrupt_fraction", corrupt_fraction)
    _check_fraction("dropout_fraction", dropout_fraction)
    corrupt = _corrupt_count(n, corrupt_fraction)
    dropouts = _dropout_count(n, dropout_fraction)
    threshold = (n + corrupt) // 2 + 1 if active_server else corrupt + 1
    threshold = max(threshold, 2)
    if threshold > n - dropouts:
        rule = "t > (n + corrupt) / 2" if active_server else "t > corrupt"
        raise ConfigurationError(
            f"no threshold for n={n}: security needs {rule}, i.e. t >= {threshold}, but "
            f"correctness needs t <= n - dropouts = {n - dropouts} "
            f"(corrupt={corrupt}, dropouts={dropouts})"
        )
    return threshold


def release_floor(n: int, threshold: int, dropout_fraction: float) -> int:
    """The fewest contributors a release of n clients may have when ``dropout_fraction`` of
    them may drop: max(t, n - ceil(dropout_fraction * n)).

    Distributed DP sizes each client's noise for this many contributors, so a release below it
    would carry less noise than promised; the session enforces it (``RoundParams.min_survivors``).
    The dropouts tolerated are rounded *up*, so at least the configured fraction is tolerated
    (4 clients at 5% tolerate one, as their classic threshold of 3 does); the noise is
    calibrated for the same floor, so the rounding costs utility, never privacy.
    """
    _check_n(n)
    _check_fraction("dropout_fraction", dropout_fraction)
    tolerated = math.ceil((dropout_fraction - _TOLERANCE) * n)
    return max(threshold, n - tolerated)

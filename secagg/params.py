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
(a seed fixed by the clients' committed randomness after the cohort, see
:mod:`secagg.protocol`), corruption is static and independent of the labels, at most gamma*n
clients are corrupt and at most delta*n drop out.

Active (semi-malicious) server: it may lie about who dropped out, showing two disjoint groups of
a client u's share holders two survivor sets, one with u (they release shares of u's self-mask
seed b_u) and one without (they release shares of u's masking key). u's secrets are shared to
its k neighbours *and to u itself* (u keeps a share of b_u and releases it when it survives), so
with a corrupt neighbours the two groups together hold k + a + 1 shares of b_u; splitting them
into two sets of t is impossible iff 2t > k + a + 1. With a <= t1 (the largest number of corrupt
neighbours that is not negligible) this is t = floor((k + 1 + t1) / 2) + 1
(:func:`active_threshold`). The reference implementation's ceil((t1 + k - 1.25) / 2) + 1 omits
the self share and is one short whenever k + t1 is odd. For the complete graph (k = n - 1,
a <= c deterministically) the same rule is Bonawitz et al.'s t = floor((n + c) / 2) + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from secagg.errors import ConfigurationError
from secagg.graph import harary_degree

DEFAULT_SECURITY_BITS = 40
#: The fraction of a cohort assumed to collude with the server unless a party says otherwise
#: (the reference points of DESIGN.md; an institution raises it in its own policy).
DEFAULT_CORRUPT_FRACTION = 0.05
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


def max_corrupt_neighbours(n: int, degree: int, corrupt: int, security_bits: int) -> int:
    """t1: the largest number of corrupt neighbours some client has with non-negligible
    probability, i.e. the smallest a with n * P[A > a] < 2^-(sigma+1), A ~ Hypergeometric(n,
    corrupt, degree) (a union bound over the n clients; exact integer arithmetic)."""
    total = math.comb(n, degree)
    weights = _hypergeometric_weights(n, corrupt, degree)
    tail = 0
    a = degree
    while a >= 0 and (tail + weights[a]) * n << (security_bits + 1) < total:
        tail += weights[a]
        a -= 1
    return max(a, 0)


def active_threshold(degree: int, corrupt_neighbours: int) -> int:
    """The smallest t an active server cannot split: 2t > degree + corrupt_neighbours + 1
    (the +1 is the share each client keeps of its own self-mask seed); at least 2."""
    return max((degree + 1 + corrupt_neighbours) // 2 + 1, 2)


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
    t1 = max_corrupt_neighbours(n, k, corrupt, security_bits)
    threshold = active_threshold(k, t1) if semi_malicious_server else max(t1 + 1, 2)
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


@dataclass(frozen=True)
class ActiveServerFloor:
    """What a client demands of a session before taking part against an active server.

    Derived by each client from the cohort size and its *own* assumed corrupt (and, for SecAgg+,
    dropout) fraction, never from what the server says: ``min_degree`` (the complete graph's
    n - 1 when no sparse graph is safe), ``min_threshold`` at the session's actual degree
    (:func:`active_threshold` over the corrupt neighbours that are not negligible) and
    ``quorum``, the number of survivor-set signatures that makes the survivor set unique:
    two sets each signed by q = floor((n + c)/2) + 1 of the n cohort members share at least
    c + 1 signers, one of them honest, and an honest client signs one set only.
    """

    cohort: int
    degree: int
    corrupt: int
    min_degree: int
    min_threshold: int
    quorum: int


def active_quorum(n: int, corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION) -> int:
    """floor((n + c)/2) + 1 with c = floor(corrupt_fraction * n): two sets of that many of the n
    cohort members share at least c + 1 members, so one of them is honest."""
    _check_n(n)
    _check_fraction("corrupt_fraction", corrupt_fraction)
    return (n + _corrupt_count(n, corrupt_fraction)) // 2 + 1


def active_server_floor(
    n: int,
    degree: int,
    corrupt_fraction: float,
    dropout_fraction: float,
    security_bits: int = DEFAULT_SECURITY_BITS,
) -> ActiveServerFloor:
    """The smallest (degree, t, quorum) a client accepts for a session of ``n`` clients whose
    neighbour graph has ``degree`` (n - 1: the complete graph).

    Complete graph: t >= floor((n + c)/2) + 1 (deterministic, c = floor(corrupt_fraction * n)).
    SecAgg+: the degree at least the semi-malicious finder's k for (n, corrupt, dropout), and
    t >= :func:`active_threshold` at the actual degree; when no sparse graph is safe for these
    fractions the complete graph is required. The quorum is floor((n + c)/2) + 1 either way.
    """
    _check_n(n)
    _check_fraction("corrupt_fraction", corrupt_fraction)
    _check_fraction("dropout_fraction", dropout_fraction)
    _check_bits("security_bits", security_bits)
    if not isinstance(degree, int) or not 1 <= degree <= n - 1:
        raise ConfigurationError(
            f"a graph over {n} clients has degree in [1, {n - 1}], got {degree}"
        )
    corrupt = _corrupt_count(n, corrupt_fraction)
    quorum = active_quorum(n, corrupt_fraction)
    if degree == n - 1:
        threshold = active_threshold(n - 1, corrupt)
        return ActiveServerFloor(n, degree, corrupt, n - 1, threshold, quorum)
    try:
        min_degree = secaggplus_params(
            n, corrupt_fraction, dropout_fraction, security_bits, semi_malicious_server=True
        ).k
    except ConfigurationError:
        min_degree = n - 1  # no sparse graph is safe at these fractions
    t1 = max_corrupt_neighbours(n, degree, corrupt, security_bits)
    return ActiveServerFloor(n, degree, corrupt, min_degree, active_threshold(degree, t1), quorum)


#: Below this many clients SecAgg+ saves nothing over the complete graph.
SECAGGPLUS_MIN_COHORT = 16


@dataclass(frozen=True)
class SessionShape:
    """The graph, Shamir threshold and survivor-set quorum a coordinator proposes for a cohort;
    clients check them against their own :func:`active_server_floor`."""

    threshold: int
    neighbours: int | None  # None: the complete graph
    quorum: int

    @property
    def min_release(self) -> int:
        return max(self.threshold, self.quorum)


def session_shape(
    n: int,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    dropout_fraction: float = 0.05,
    *,
    neighbours: int | None = None,
    sparse: bool = False,
    min_threshold: int = 2,
    security_bits: int = DEFAULT_SECURITY_BITS,
) -> SessionShape:
    """The smallest parameters that hold against an active server for n clients.

    ``sparse``: SecAgg+ at the semi-malicious finder's degree when n >= SECAGGPLUS_MIN_COHORT
    and a sparse graph is safe, else the complete graph. ``neighbours``: SecAgg+ with at least
    that degree (raised to the finder's when smaller; the complete graph when that covers
    everyone). ``min_threshold`` raises t, never lowers it. Raises :class:`ConfigurationError`
    when correctness (n - dropouts survivors) cannot meet the threshold.
    """
    _check_n(n)
    quorum = active_quorum(n, corrupt_fraction)
    if neighbours is not None or (sparse and n >= SECAGGPLUS_MIN_COHORT):
        try:
            plus = secaggplus_params(
                n, corrupt_fraction, dropout_fraction, security_bits, semi_malicious_server=True
            )
            degree = harary_degree(n, max(plus.k, neighbours or 0))
            if degree < n - 1:
                floor = active_server_floor(
                    n, degree, corrupt_fraction, dropout_fraction, security_bits
                )
                return SessionShape(max(floor.min_threshold, min_threshold), degree, quorum)
        except ConfigurationError:
            pass  # no sparse graph is safe here: the complete graph always is
    threshold = max(classic_threshold(n, corrupt_fraction, dropout_fraction), min_threshold)
    if threshold > n:
        raise ConfigurationError(f"threshold {threshold} exceeds the cohort of {n}")
    return SessionShape(threshold, None, max(threshold, quorum))

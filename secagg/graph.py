"""Neighbour graphs that every party derives identically from public inputs.

Classic SecAgg (Bonawitz et al., CCS'17) masks each input with every other client: the complete
graph. SecAgg+ (Bell et al., CCS'20) masks only with the k neighbours in a Harary graph H_{k,n}
whose vertex labels are permuted pseudorandomly. The permutation comes from a public 32-byte
seed so that all parties (and an auditor) compute the same graph; its security rests on the
seed being fixed after the cohort and corrupt set, so neither the server nor the corrupt
clients can place themselves around an honest client. The permutation is derived with SHA-256
only (no numpy RNG, no Python ``random``): it is identical on every platform and version.

H_{k,n} on ring positions 0..n-1 (Harary 1962), for k < n-1:

* k even: position p is adjacent to p±1, ..., p±k/2 (mod n);
* k odd, n even: the k-1 construction plus the "diameter" edge p <-> p + n/2;
* k odd, n odd: no k-regular graph exists (the degree sum n*k would be odd), so the k+1
  construction is used: every vertex gets at least the k neighbours asked for.

k >= n-1 gives the complete graph. Every graph here is symmetric and regular.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from secagg.errors import ConfigurationError, UnknownClient

SEED_BYTES = 32
_MAX_ID = 1 << 64  # ids are hashed as 8 bytes
_PERMUTATION_DOMAIN = b"fedsec/secagg/harary-permutation/v1\x00"


@dataclass(frozen=True)
class NeighbourGraph:
    """A symmetric regular graph over the cohort ``ids``.

    ``ring`` is the cohort in ring order and ``offsets`` the ring distances to neighbours
    (each offset o < n; o and n-o both present unless o = n/2). Build one with
    :func:`complete_graph` or :func:`harary_graph`.
    """

    ids: tuple[int, ...]
    ring: tuple[int, ...]
    offsets: tuple[int, ...]
    _position: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_ids(self.ids)
        if tuple(sorted(self.ring)) != self.ids:
            raise ConfigurationError("the ring order must be a permutation of the cohort ids")
        n = len(self.ids)
        offset_set = set(self.offsets)
        if len(offset_set) != len(self.offsets) or any(not 0 < o < n for o in self.offsets):
            raise ConfigurationError(f"offsets must be distinct and in [1, {n - 1}]")
        if any(n - o not in offset_set for o in self.offsets):
            raise ConfigurationError("offsets must be closed under negation (a symmetric graph)")
        object.__setattr__(self, "_position", {u: p for p, u in enumerate(self.ring)})

    @property
    def degree(self) -> int:
        """The number of neighbours of every vertex."""
        return len(self.offsets)

    @property
    def is_complete(self) -> bool:
        return self.degree == len(self.ids) - 1

    def __contains__(self, u: object) -> bool:
        return u in self._position

    def __len__(self) -> int:
        return len(self.ids)

    def neighbours(self, u: int) -> tuple[int, ...]:
        """u's neighbours in increasing order (never u itself); O(k log k)."""
        position = self._position.get(u)
        if position is None:
            raise UnknownClient(f"client {u!r} is not in this cohort of {len(self.ids)} clients")
        if self.is_complete:
            i = bisect.bisect_left(self.ids, u)
            return self.ids[:i] + self.ids[i + 1 :]
        n = len(self.ring)
        return tuple(sorted(self.ring[(position + o) % n] for o in self.offsets))


def _check_ids(ids: tuple[int, ...]) -> None:
    if not ids:
        raise ConfigurationError("the cohort is empty")
    for u in ids:
        if not isinstance(u, int) or isinstance(u, bool):
            raise ConfigurationError(f"client ids must be integers, got {u!r}")
        if u < 1:
            raise ConfigurationError(f"client ids must be >= 1 (Shamir x-coordinates), got {u}")
        if u >= _MAX_ID:
            raise ConfigurationError(f"client ids must be < 2^64, got {u}")
    for previous, current in itertools.pairwise(ids):
        if current == previous:
            raise ConfigurationError(f"duplicate client id {current} in the cohort")
        if current < previous:
            raise ConfigurationError("cohort ids must be sorted")


def _normalise(ids: Iterable[int]) -> tuple[int, ...]:
    cohort = tuple(ids)
    for u in cohort:
        if not isinstance(u, int) or isinstance(u, bool):
            raise ConfigurationError(f"client ids must be integers, got {u!r}")
    cohort = tuple(sorted(cohort))
    _check_ids(cohort)
    return cohort


def complete_graph(ids: Iterable[int]) -> NeighbourGraph:
    """Classic SecAgg: every client is every other client's neighbour."""
    cohort = _normalise(ids)
    return _complete(cohort)


@lru_cache(maxsize=16)
def _complete(cohort: tuple[int, ...]) -> NeighbourGraph:
    return NeighbourGraph(ids=cohort, ring=cohort, offsets=tuple(range(1, len(cohort))))


def _harary_offsets(n: int, k: int) -> tuple[int, ...]:
    if k % 2 == 1 and n % 2 == 1:
        k += 1  # no odd-degree regular graph on an odd number of vertices
    if k >= n - 1:
        return tuple(range(1, n))
    half = k // 2
    offsets = [*range(1, half + 1), *range(n - half, n)]
    if k % 2 == 1:
        offsets.append(n // 2)  # the diameter edge; n is even here
    return tuple(sorted(offsets))


def harary_degree(n: int, k: int) -> int:
    """The degree of :func:`harary_graph` over n clients asked for degree k (k, k+1 when k and
    n are both odd, n-1 when k >= n-1); needs no seed."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigurationError(f"the neighbourhood degree k must be an integer >= 1, got {k!r}")
    return len(_harary_offsets(n, k))


def _permuted(cohort: tuple[int, ...], seed: bytes) -> tuple[int, ...]:
    # Sorting by a keyed hash is a uniformly random permutation in the random-oracle model;
    # the id is the tie-break, although a SHA-256 collision would be a discovery in itself.
    def key(u: int) -> tuple[bytes, int]:
        digest = hashlib.sha256(_PERMUTATION_DOMAIN + seed + u.to_bytes(8, "big")).digest()
        return digest, u

    return tuple(sorted(cohort, key=key))


def harary_graph(ids: Iterable[int], k: int, seed: bytes) -> NeighbourGraph:
    """SecAgg+: H_{k,n} over ``ids`` with ring labels permuted by the public ``seed``.

    The same (ids, k, seed) gives the same graph in every process; the result is cached, so a
    simulation of many clients pays the O(n log n) construction once. Degree is k, or k+1 when
    k and n are both odd, or n-1 when k >= n-1 (the complete graph).
    """
    cohort = _normalise(ids)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigurationError(f"the neighbourhood degree k must be an integer >= 1, got {k!r}")
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ConfigurationError(f"the graph seed must be {SEED_BYTES} bytes")
    return _harary(cohort, k, seed)


@lru_cache(maxsize=16)
def _harary(cohort: tuple[int, ...], k: int, seed: bytes) -> NeighbourGraph:
    return NeighbourGraph(
        ids=cohort, ring=_permuted(cohort, seed), offsets=_harary_offsets(len(cohort), k)
    )

"""Neighbour graphs: symmetric, regular, the same for every party, and strict about input."""

from __future__ import annotations

import hashlib

import pytest

from secagg.errors import ConfigurationError, UnknownClient
from secagg.graph import NeighbourGraph, complete_graph, harary_graph


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _assert_symmetric_regular(graph: NeighbourGraph, degree: int) -> None:
    assert graph.degree == degree
    for u in graph.ids:
        neighbours = graph.neighbours(u)
        assert len(neighbours) == degree
        assert u not in neighbours
        assert list(neighbours) == sorted(set(neighbours))
        for v in neighbours:
            assert u in graph.neighbours(v)


@pytest.mark.parametrize("n", [2, 3, 8, 9, 40, 41])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 12])
def test_harary_is_symmetric_and_regular(n: int, k: int) -> None:
    ids = [3 * i + 2 for i in range(n)]  # sparse, non-contiguous ids
    graph = harary_graph(ids, k, _seed(f"{n}/{k}"))
    if k >= n - 1:
        expected = n - 1
    elif k % 2 == 1 and n % 2 == 1:
        expected = min(k + 1, n - 1)
    else:
        expected = k
    _assert_symmetric_regular(graph, expected)
    assert graph.ids == tuple(ids)


def test_harary_even_k_is_a_circulant_on_the_permuted_ring() -> None:
    graph = harary_graph(range(1, 21), 6, _seed("ring"))
    for p, u in enumerate(graph.ring):
        expected = {graph.ring[(p + d) % 20] for d in (-3, -2, -1, 1, 2, 3)}
        assert set(graph.neighbours(u)) == expected


def test_harary_odd_k_even_n_adds_the_diameter() -> None:
    graph = harary_graph(range(1, 11), 3, _seed("diameter"))
    for p, u in enumerate(graph.ring):
        expected = {graph.ring[(p - 1) % 10], graph.ring[(p + 1) % 10], graph.ring[(p + 5) % 10]}
        assert set(graph.neighbours(u)) == expected


def test_large_k_gives_the_complete_graph() -> None:
    ids = range(1, 31)
    graph = harary_graph(ids, 29, _seed("big"))
    assert graph.is_complete
    assert graph.neighbours(7) == complete_graph(ids).neighbours(7)


def test_same_inputs_same_graph_in_any_order() -> None:
    seed = _seed("same")
    first = harary_graph([5, 1, 9, 4, 12, 30, 2, 8], 4, seed)
    second = harary_graph((1, 2, 4, 5, 8, 9, 12, 30), 4, bytes(seed))
    assert first == second
    assert all(first.neighbours(u) == second.neighbours(u) for u in first.ids)


def test_permutation_is_pinned() -> None:
    # Every party, on every platform and version, must derive this exact ring from the seed.
    graph = harary_graph(range(1, 11), 4, bytes(32))
    assert graph.ring == (9, 2, 7, 8, 4, 5, 3, 6, 10, 1)


def test_different_seed_gives_a_different_graph() -> None:
    ids = range(1, 101)
    first = harary_graph(ids, 10, _seed("a"))
    second = harary_graph(ids, 10, _seed("b"))
    assert first.ring != second.ring
    assert any(first.neighbours(u) != second.neighbours(u) for u in ids)


def test_harary_is_sparse_and_cached() -> None:
    ids = tuple(range(1, 2001))
    seed = _seed("cache")
    graph = harary_graph(ids, 30, seed)
    assert harary_graph(list(ids), 30, seed) is graph  # 1000 simulated clients build it once
    assert len(graph.neighbours(1000)) == 30


def test_complete_graph() -> None:
    graph = complete_graph([4, 1, 3])
    assert graph.neighbours(1) == (3, 4)
    assert graph.neighbours(3) == (1, 4)
    _assert_symmetric_regular(graph, 2)
    assert complete_graph([7]).neighbours(7) == ()


def test_membership_and_unknown_client() -> None:
    graph = harary_graph(range(1, 11), 4, _seed("member"))
    assert 3 in graph
    assert 11 not in graph
    assert len(graph) == 10
    with pytest.raises(UnknownClient, match="11"):
        graph.neighbours(11)


@pytest.mark.parametrize(
    ("ids", "k", "seed", "message"),
    [
        ([1, 2, 2, 3], 2, bytes(32), "duplicate"),
        ([0, 1, 2], 2, bytes(32), ">= 1"),
        ([-4, 1, 2], 2, bytes(32), ">= 1"),
        ([], 2, bytes(32), "empty"),
        ([1, 2, 3], 0, bytes(32), "degree"),
        ([1, 2, 3], 2, bytes(31), "32 bytes"),
        ([1, 2, 3], 2, "x" * 32, "32 bytes"),
        ([1, 2.0, 3], 2, bytes(32), "integers"),
        ([1, 2, 1 << 64], 2, bytes(32), "2\\^64"),
    ],
)
def test_invalid_input_is_refused(ids: list[int], k: int, seed: bytes, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        harary_graph(ids, k, seed)


def test_complete_graph_refuses_duplicates() -> None:
    with pytest.raises(ConfigurationError, match="duplicate"):
        complete_graph([1, 1])

"""Splitting one data set into institutions: IID, by a field, Dirichlet label skew; seeded."""

from __future__ import annotations

import numpy as np
import pytest

from clients.partition import PartitionError, PartitionSpec, partition

LABELS = ["qa"] * 40 + ["summary"] * 40 + ["brainstorm"] * 40


def _covers_each_index_once(parts: dict[str, list[int]], n: int) -> bool:
    flat = sorted(i for ix in parts.values() for i in ix)
    return flat == list(range(n))


def test_iid_is_a_seeded_even_split() -> None:
    parts = partition(LABELS, PartitionSpec("iid", institutions=4, seed=1))
    assert list(parts) == [f"institution-{k}" for k in (1, 2, 3, 4)]
    assert [len(v) for v in parts.values()] == [30] * 4
    assert _covers_each_index_once(parts, len(LABELS))
    assert parts == partition(LABELS, PartitionSpec("iid", institutions=4, seed=1))
    assert parts != partition(LABELS, PartitionSpec("iid", institutions=4, seed=2))


def test_by_field_gives_one_institution_per_value() -> None:
    parts = partition(LABELS, PartitionSpec("field", field="category"))
    assert sorted(parts) == ["brainstorm", "qa", "summary"]
    assert parts["qa"] == list(range(40))
    with pytest.raises(PartitionError, match="3 distinct values, not the 4"):
        partition(LABELS, PartitionSpec("field", institutions=4, field="category"))
    with pytest.raises(PartitionError, match=r"have no field 'category'.*record 2"):
        partition(["qa", None, "x"], PartitionSpec("field", field="category"))


def test_dirichlet_skews_labels_more_at_small_alpha() -> None:
    def skew(alpha: float) -> float:
        parts = partition(LABELS, PartitionSpec("dirichlet", 3, "category", alpha, seed=0))
        assert _covers_each_index_once(parts, len(LABELS))
        # Mean share of each institution's most common label.
        return float(
            np.mean(
                [max(np.unique([LABELS[i] for i in ix], return_counts=True)[1]) / len(ix)
                 for ix in parts.values()]
            )
        )  # fmt: skip

    assert skew(0.1) > skew(100.0) + 0.2
    assert skew(100.0) < 0.5  # nearly IID
    with pytest.raises(PartitionError, match="fewer than 2"):
        partition(LABELS[:6], PartitionSpec("dirichlet", 5, "category", 0.01))


def test_specs_are_checked() -> None:
    with pytest.raises(PartitionError, match="needs a field"):
        PartitionSpec("dirichlet", institutions=3)
    with pytest.raises(PartitionError, match="2 or more institutions"):
        PartitionSpec("iid", institutions=1)
    with pytest.raises(PartitionError, match="fewer than 2 records"):
        partition(["a"] * 5, PartitionSpec("iid", institutions=4))

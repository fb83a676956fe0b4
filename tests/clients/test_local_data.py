"""The institutions of a simulation from local files: a folder of files or one split file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.local_data import DataLayoutError, load_data
from clients.partition import PartitionSpec


def _jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_folder_of_mixed_file_types_with_its_own_eval_sets(tmp_path: Path) -> None:
    _jsonl(tmp_path / "north.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(5)])
    (tmp_path / "south.csv").write_text("instruction,output\n" + "q,a\n" * 4)
    (tmp_path / "test").mkdir()
    _jsonl(tmp_path / "test" / "north.jsonl", [{"prompt": "t", "completion": "c"}])
    data = load_data(tmp_path)
    assert {k: len(v) for k, v in data.train.items()} == {"north": 5, "south": 4}
    assert list(data.test) == ["north"] and "test/" in data.description
    _jsonl(tmp_path / "test" / "east.jsonl", [{"prompt": "t", "completion": "c"}])
    with pytest.raises(DataLayoutError, match="eval sets of unknown institutions: east"):
        load_data(tmp_path)


def test_without_eval_sets_each_institution_holds_out_its_last_tenth(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(20)])
    _jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}", "completion": "c"} for i in range(3)])
    data = load_data(tmp_path)
    assert (len(data.train["a"]), len(data.test["a"])) == (18, 2)
    assert (len(data.train["b"]), len(data.test["b"])) == (2, 1)
    assert data.test["a"][-1].turns[0][1] == "p19"


def test_one_file_needs_a_partition_and_a_folder_refuses_one(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": "c", "site": f"s{i % 3}"} for i in range(30)]
    _jsonl(tmp_path / "all.jsonl", rows)
    with pytest.raises(DataLayoutError, match="say how to split it"):
        load_data(tmp_path / "all.jsonl")
    data = load_data(tmp_path / "all.jsonl", PartitionSpec("iid", institutions=3, seed=1))
    assert sorted(data.train) == ["institution-1", "institution-2", "institution-3"]
    assert sum(len(v) for v in data.train.values()) + sum(len(v) for v in data.test.values()) == 30
    again = load_data(tmp_path / "all.jsonl", PartitionSpec("iid", institutions=3, seed=1))
    assert [e.turns for e in again.test["institution-1"]] == [
        e.turns for e in data.test["institution-1"]
    ]
    by_site = load_data(tmp_path / "all.jsonl", PartitionSpec("field", field="site"))
    assert sorted(by_site.train) == ["s0", "s1", "s2"]
    with pytest.raises(DataLayoutError, match="a partition applies to one data file"):
        load_data(tmp_path, PartitionSpec("iid", institutions=3))

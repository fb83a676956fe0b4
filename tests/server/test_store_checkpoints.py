"""SQLite round record and safetensors checkpoints: transitions, crash recovery, integrity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from server.checkpoints import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from server.store import RoundStatus, Store, StoreError


def test_round_lifecycle_and_queries(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.seen(1, "a")
    store.seen(2, "b")
    first = store.begin_round(0, os.urandom(32), (1, 2))
    store.record_stage(first, "advertise", 2, 2, False, 0.1)
    store.record_stage(first, "masked_input", 2, 1, True, 5.0)
    store.complete_round(first, (1,), "round-000000.safetensors")
    second = store.begin_round(1, os.urandom(32), (1, 2))
    store.abort_round(second, "too few survivors")
    rounds = store.rounds()
    assert [(r.round_number, r.status) for r in rounds] == [
        (0, RoundStatus.COMPLETED),
        (1, RoundStatus.ABORTED),
    ]
    assert rounds[0].contributors == (1,) and rounds[1].reason == "too few survivors"
    last = store.last_completed()
    assert last is not None and last.checkpoint == "round-000000.safetensors"
    assert [s.stage for s in store.stages(first)] == ["advertise", "masked_input"]
    assert store.stages(first)[1].deadline_hit
    assert [(p.client_id, p.rounds_joined) for p in store.participants()] == [(1, 2), (2, 2)]
    with pytest.raises(StoreError, match="not running"):
        store.complete_round(second, (1, 2), "x")


def test_crash_leaves_running_round_that_recovery_aborts(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    crashed = Store(path)
    session = os.urandom(32)
    attempt = crashed.begin_round(3, session, (1, 2, 3))
    with pytest.raises(StoreError, match="still running"):
        crashed.begin_round(3, os.urandom(32), (1, 2, 3))
    del crashed  # no clean shutdown: the row stays 'running'

    restarted = Store(path)
    recovered = restarted.recover()
    assert [(r.attempt, r.session_id) for r in recovered] == [(attempt, session)]
    assert restarted.attempt(attempt).status is RoundStatus.ABORTED
    # The rerun is a new attempt of the same round, under a fresh session id.
    rerun = restarted.begin_round(3, os.urandom(32), (1, 2, 3))
    assert rerun != attempt
    restarted.abort_round(rerun, "test")
    with pytest.raises(StoreError, match="session id already used"):
        restarted.begin_round(3, session, (1,))


def test_readonly_store_reads_while_the_writer_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    writer = Store(path)
    writer.begin_round(0, os.urandom(32), (1, 2))
    reader = Store(path, readonly=True)
    assert reader.rounds()[0].status is RoundStatus.RUNNING
    with pytest.raises(StoreError, match="no state database"):
        Store(tmp_path / "missing.db", readonly=True)


def test_checkpoint_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    vector = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    state = {"m": np.ones(1000, np.float32), "v": np.zeros(1000, np.float32)}
    path = save_checkpoint(tmp_path, Checkpoint(4, vector, state))
    assert path.name == "round-000004.safetensors"
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_checkpoint(path)
    assert loaded.round_number == 4
    np.testing.assert_array_equal(loaded.global_vector, vector)
    assert set(loaded.strategy_state) == {"m", "v"}

    # Same metadata, one coordinate changed: the recorded digest no longer matches.
    tampered = vector.copy()
    tampered[7] += 1.0
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    save_file(
        {"global": tampered, **{f"strategy/{k}": v for k, v in state.items()}},
        str(path),
        metadata=metadata,
    )
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_checkpoint_retention_keeps_the_newest_and_their_adapters(tmp_path: Path) -> None:
    for number in range(5):
        save_checkpoint(tmp_path, Checkpoint(number, np.full(4, number, dtype=np.float32)))
        (tmp_path / f"adapter-{number:06d}").mkdir()
    assert prune_checkpoints(tmp_path, 0) == []  # 0: keep everything
    assert prune_checkpoints(tmp_path, 2) == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter-000003",
        "adapter-000004",
        "round-000003.safetensors",
        "round-000004.safetensors",
    ]
    assert load_checkpoint(tmp_path / "round-000004.safetensors").global_vector[0] == 4


def test_split_checkpoint_carries_the_server_part(tmp_path: Path) -> None:
    vector = np.arange(10, dtype=np.float32)
    part = np.linspace(-1, 1, 7, dtype=np.float32)
    path = save_checkpoint(tmp_path, Checkpoint(2, vector, {}, part))
    loaded = load_checkpoint(path)
    assert loaded.server_part is not None
    np.testing.assert_array_equal(loaded.server_part, part)
    assert load_checkpoint(save_checkpoint(tmp_path, Checkpoint(3, vector))).server_part is None
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    save_file({"global": vector, "split/server": part + 1}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="server part does not match"):
        load_checkpoint(path)

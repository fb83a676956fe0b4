"""server.parallel_unmask: the process-pool sum backend matches the single-process one bit for
bit, fails with a named error when a worker dies, and never outlives the server."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secagg.errors import InconsistentSharesError, MessageFormatError, ProtocolAbort
from secagg.messages import ServerMessage, UnmaskRequest
from secagg.packing import add_packed, pack
from secagg.params import secaggplus_params
from secagg.prg import BLOCK_BYTES, accumulate_masks
from secagg.protocol import InProcessSum, RoundParams, Stage
from secagg.protocol.common import self_mask_commitment
from secagg.protocol.server import SelfMaskJob, unmask_keys
from secagg.ring import Ring, RingArray
from secagg.shamir import split
from secagg.simulate import Simulation
from server.parallel_unmask import (
    ParallelSum,
    PoolClosed,
    WorkerDied,
    WorkerFailed,
    split_ranges,
)

WORKER_COUNTS = (1, 2, 4)


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[int, ParallelSum]]:
    made = {w: ParallelSum(w) for w in WORKER_COUNTS}
    yield made
    for pool in made.values():
        pool.close()


def _words(ring: Ring, rng: np.random.Generator, dim: int) -> RingArray:
    return ring.reduce(rng.integers(0, 2**63, size=dim, dtype=np.uint64).astype(ring.dtype))


def _unaligned(dim: int, workers: int, ring: Ring) -> bool:
    """Whether some worker's range starts inside an AES block."""
    itemsize = ring.dtype.itemsize
    return any(a * itemsize % BLOCK_BYTES for a, _ in split_ranges(dim, workers))


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_parallel_mask_removal_is_bit_identical_to_one_process(
    pools: dict[int, ParallelSum], workers: int, bits: int
) -> None:
    ring = Ring(bits)
    rng = np.random.default_rng(1000 * workers + bits)
    # Random n and d, plus the edges: fewer elements than workers, one element, ranges that
    # start mid-block, and d spanning several 128 KiB chunks per worker.
    dims = [1, 3, 1003, 70_001, *rng.integers(2, 300_000, size=3).tolist()]
    if workers > 1:
        assert any(_unaligned(d, workers, ring) for d in dims)
    for dim in dims:
        n = int(rng.integers(0, 40))
        keys = [os.urandom(16) for _ in range(n)]
        cut = int(rng.integers(0, n + 1))
        start = _words(ring, rng, dim)
        expected = accumulate_masks(start.copy(), ring, keys[:cut], keys[cut:])
        got = start.copy()
        pools[workers].remove_masks(got, ring, keys[:cut], keys[cut:])
        np.testing.assert_array_equal(got, expected, err_msg=f"dim={dim} n={n}")


@pytest.mark.parametrize("bits", [5, 20, 32, 48, 64])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_parallel_add_is_bit_identical_to_one_process(
    pools: dict[int, ParallelSum], workers: int, bits: int
) -> None:
    ring = Ring(bits)
    rng = np.random.default_rng(bits)
    for dim in (1, 9, 1003, 200_003):
        total = rng.integers(0, 2**63, size=dim, dtype=np.uint64).astype(ring.dtype)
        payload = pack(_words(ring, rng, dim), ring)
        expected = add_packed(total.copy(), payload, ring)
        pools[workers].add_packed(total, payload, ring)
        np.testing.assert_array_equal(total, expected)


def test_a_malformed_payload_is_refused_before_anything_is_added(
    pools: dict[int, ParallelSum],
) -> None:
    ring = Ring(20)
    total = np.arange(10, dtype=np.uint32)
    payload = pack(ring.zeros(9), ring)  # one element short
    with pytest.raises(MessageFormatError):
        pools[2].add_packed(total, payload, ring)
    np.testing.assert_array_equal(total, np.arange(10))


def _self_job(owner: int, commitment: bytes | None = None) -> SelfMaskJob:
    sid, seed = os.urandom(32), os.urandom(32)
    shares = split([seed], 3, [1, 2, 3, 4])[0]
    good = self_mask_commitment(sid, owner, seed)
    return SelfMaskJob(
        sid, owner, tuple(zip([1, 2, 3, 4], shares, strict=True)), 3, commitment or good
    )


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_parallel_reconstruction_matches_one_process_in_order(
    pools: dict[int, ParallelSum], workers: int
) -> None:
    for count in (1, 2, 7):
        jobs = [_self_job(owner) for owner in range(1, count + 1)]
        assert pools[workers].map(unmask_keys, jobs) == InProcessSum().map(unmask_keys, jobs)


def test_the_first_failing_job_raises_its_own_error(pools: dict[int, ParallelSum]) -> None:
    jobs = [_self_job(owner) for owner in range(1, 10)]
    jobs[5] = _self_job(6, commitment=b"\x00" * 32)
    jobs[8] = _self_job(9, commitment=b"\x00" * 32)
    with pytest.raises(InconsistentSharesError, match="client 6 does not match"):
        pools[4].map(unmask_keys, jobs)
    with pytest.raises(WorkerFailed, match="ValueError"):  # not a protocol error: the worker's
        pools[2].map(math.sqrt, [4.0, -1.0])
    assert pools[2].map(math.sqrt, [4.0, 9.0]) == [2.0, 3.0]


def test_split_ranges_cover_the_vector_in_aligned_pieces() -> None:
    assert split_ranges(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert split_ranges(3, 4) == [(0, 1), (1, 2), (2, 3)]
    assert split_ranges(0, 4) == []
    assert split_ranges(100, 3, 8) == [(0, 32), (32, 64), (64, 100)]
    assert split_ranges(9, 4, 8) == [(0, 8), (8, 9)]


@pytest.mark.parametrize("bits", [20, 32])
def test_a_whole_secaggplus_session_through_the_pool(
    pools: dict[int, ParallelSum], bits: int
) -> None:
    plus = secaggplus_params(30, 0.05, 0.05, semi_malicious_server=True)
    params = RoundParams(os.urandom(32), bits, 5003, plus.t, tuple(range(1, 31)), plus.k)
    rng = np.random.default_rng(7)
    inputs = {u: _words(params.ring, rng, params.dim) for u in params.cohort}
    sim = Simulation(
        params, inputs, dropouts={Stage.MASKED_INPUT: {4, 11}}, server_backend=pools[4]
    )
    outcome = sim.run()
    expected = params.ring.zeros(params.dim)
    for u in outcome.result.contributors:
        np.add(expected, inputs[u], out=expected)
    assert 4 not in outcome.result.contributors and len(outcome.result.contributors) == 28
    np.testing.assert_array_equal(outcome.result.sum, params.ring.reduce(expected))


def _state(pid: int) -> str:
    """The process state letter from /proc ('R' running, 'S' sleeping, 'Z' zombie; '' gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _alive(pid: int) -> bool:
    """Running or sleeping (a zombie, exited but not yet reaped by a busy init, is gone)."""
    return _state(pid) not in ("", "Z")


def _kill_when_busy(pid: int) -> threading.Thread:
    """Kill ``pid`` once it starts computing (it sleeps in recv until a call reaches it)."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while _state(pid) != "R" and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_worker_killed_mid_call_is_a_named_error_and_the_pool_recovers() -> None:
    ring = Ring(32)
    keys = [os.urandom(16) for _ in range(40)]
    start = np.arange(4_000_000, dtype=np.uint32)
    with ParallelSum(2) as pool:
        first = pool.worker_pids()
        killer = _kill_when_busy(first[1])
        total = start.copy()
        with pytest.raises(WorkerDied, match=rf"worker process {first[1]} exited"):
            pool.remove_masks(total, ring, keys[:20], keys[20:])
        killer.join()
        np.testing.assert_array_equal(total, start)  # the session's sum is not touched
        assert pool.worker_pids() == []  # all stopped; fresh ones for the next call
        pool.remove_masks(total, ring, keys[:20], keys[20:])
        np.testing.assert_array_equal(total, accumulate_masks(start, ring, keys[:20], keys[20:]))
        assert len(pool.worker_pids()) == 2 and set(pool.worker_pids()).isdisjoint(first)


def test_a_worker_that_raises_is_a_named_error(pools: dict[int, ParallelSum]) -> None:
    total = np.arange(100, dtype=np.uint32)
    with pytest.raises(WorkerFailed, match="ConfigurationError: a PRG key is 16 bytes"):
        pools[2].remove_masks(total, Ring(32), [b"short"], ())
    np.testing.assert_array_equal(total, np.arange(100))
    pools[2].remove_masks(total, Ring(32), [b"k" * 16], [b"k" * 16])  # the pool goes on
    np.testing.assert_array_equal(total, np.arange(100))


def test_a_dead_worker_aborts_the_session_and_releases_nothing() -> None:
    params = RoundParams(os.urandom(32), 32, 1000, 3, (1, 2, 3, 4), None)
    rng = np.random.default_rng(3)
    inputs = {u: _words(params.ring, rng, params.dim) for u in params.cohort}
    with ParallelSum(2) as pool:
        victim = pool.worker_pids()[0]

        def kill_before_unmask(message: ServerMessage) -> ServerMessage:
            # Unmask requests go out just before the server removes the masks in the pool.
            if isinstance(message, UnmaskRequest) and _alive(victim):
                os.kill(victim, signal.SIGKILL)
                while _alive(victim):
                    time.sleep(0.01)
            return message

        sim = Simulation(params, inputs, server_hook=kill_before_unmask, server_backend=pool)
        with pytest.raises(WorkerDied):
            sim.run()
    assert sim.server.stage is Stage.ABORTED
    assert sim.server.abort_reason is not None and "exited" in sim.server.abort_reason
    assert not sim.server.transcript.releases
    with pytest.raises(ProtocolAbort):
        _ = sim.server.result


def test_closed_pool_stops_its_workers_and_refuses_work() -> None:
    pool = ParallelSum(2)
    pids = pool.worker_pids()
    pool.close()
    assert all(not _alive(pid) for pid in pids)
    with pytest.raises(PoolClosed):
        pool.remove_masks(np.zeros(8, dtype=np.uint32), Ring(32), [b"k" * 16], ())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_exit_when_the_server_process_is_killed() -> None:
    script = (
        "import sys, time\n"
        "from server.parallel_unmask import ParallelSum\n"
        "pool = ParallelSum(2)\n"
        "print(*pool.worker_pids(), flush=True)\n"
        "time.sleep(60)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        pids = [int(p) for p in server.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        server.kill()  # SIGKILL: no cleanup runs in the server
        server.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        if server.poll() is None:
            server.kill()

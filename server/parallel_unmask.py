"""The server's heavy work on every core: secret reconstruction, mask removal and unpacking.

Python runs AES-CTR, numpy and big-integer arithmetic one call at a time per process, so using
every core takes processes. :class:`ParallelSum` is a :class:`secagg.protocol.SumBackend` that
the round loop hands to each :class:`~secagg.protocol.ServerSession` (which itself stays free of
processes):

- **Mask removal** (the unmask stage, n·d words of keystream): the running sum is copied into a
  shared-memory block the pool owns, each worker removes every mask from its own range of it
  (the AES-CTR PRG is seekable: :func:`secagg.prg.accumulate_masks` with ``offset``; ranges
  need not start on an AES block), and the result is copied back. Two copies of d words
  against n·d words of keystream.
- **Reconstruction** (the unmask stage's Shamir reconstructions, key agreements with dropped
  clients and key derivations: :func:`secagg.protocol.server.unmask_keys` on each job): the
  jobs are dealt round-robin to the workers, and the first protocol error in job order is
  raised as it is (an inconsistent share aborts the session exactly as in one process).
- **Masked inputs** (one payload at a time, as they arrive): a 32- or 64-bit payload is added
  in the calling thread, in place, in one pass (splitting it would cost more in copies than it
  saves); a narrower width, whose unpacking is the expensive part, is copied into a shared
  payload block, each worker unpacks its range (starting at a multiple of 8 elements, so on a
  whole byte) into the shared vector block, and the calling thread adds that to the sum.
- **Shares and keys** travel to the workers over their pipes. They are the server's own (shares
  it was sent, secrets it reconstructs), passed between its own processes, and no worker keeps
  them after a call.
- **Memory**: the two shared blocks (d words, one packed payload) and a bounded scratch per
  worker: O(d) whatever the number of clients; no per-client vector is kept anywhere.

Failure: a worker that dies or raises during a call makes the call raise :class:`WorkerDied`
or :class:`WorkerFailed` (:class:`~secagg.errors.SumBackendFailure`: the session aborts and
releases nothing, and the round is rerun). The session's ``total`` is left as it was, since
results are copied back only once every worker has answered. The pool then stops all its
workers and starts fresh ones for the next call.

Lifetime: :meth:`ParallelSum.close` (or leaving its ``with`` block) stops the workers and
unlinks the shared memory. Workers are started with ``spawn`` (forking a process that runs
gRPC's threads is unsafe) and each watches its parent: when the server process goes away, even
by SIGKILL, its workers exit, so none outlives the server. As with any ``spawn`` pool, a script
that creates one must do so under ``if __name__ == "__main__":`` (the workers import the main
module).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from secagg.errors import ConfigurationError, SecAggError, SumBackendFailure
from secagg.packing import RANGE_ALIGN, add_packed, check_packed, unpack_into
from secagg.prg import accumulate_masks, raw_keystream_seconds
from secagg.ring import Ring, RingArray

#: Seconds a worker gets to exit after being asked to, before it is terminated.
STOP_GRACE_S = 5.0

_Job = TypeVar("_Job")
_Result = TypeVar("_Result")


class WorkerDied(SumBackendFailure):
    """A worker process exited during a call (killed, out of memory): the call's result is
    lost, the session aborts, and the pool starts fresh workers for the next call."""


class WorkerFailed(SumBackendFailure):
    """A worker process raised during a call; its message names the exception."""


class PoolClosed(SumBackendFailure):
    """The pool was used after :meth:`ParallelSum.close` (the server is shutting down)."""


# --- what crosses the pipes ---------------------------------------------------------------------


@dataclass(frozen=True)
class _RemoveMasks:
    vector: str  # shared-memory block holding the running sum, `length` words
    length: int
    bits: int
    start: int
    stop: int
    add_keys: tuple[bytes, ...]
    subtract_keys: tuple[bytes, ...]


@dataclass(frozen=True)
class _Unpack:
    vector: str  # block the worker writes its unpacked range into
    payload: str  # block holding the packed payload, `payload_bytes` long
    payload_bytes: int
    length: int
    bits: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Keystream:
    keys: tuple[bytes, ...]
    bits: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Map:
    function: Callable[[Any], Any]  # module-level: pickled by name
    jobs: tuple[Any, ...]


_Task = _RemoveMasks | _Unpack | _Keystream | _Map


def split_ranges(length: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``0 .. length`` as evenly as possible, each starting
    at a multiple of ``align``; empty ranges are left out."""
    units = -(-length // align)
    bounds = [min(length, units * i // parts * align) for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


# --- the worker process -------------------------------------------------------------------------


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)  # the server is gone: nothing here is worth finishing

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _attach(attached: dict[str, SharedMemory], names: Sequence[str]) -> None:
    """Map exactly the blocks ``names`` (the pool replaces a block when it grows)."""
    for name in [n for n in attached if n not in names]:
        attached.pop(name).close()
    for name in names:
        if name not in attached:
            attached[name] = SharedMemory(name=name)


def _buffer(block: SharedMemory) -> memoryview:
    buf = block.buf
    if buf is None:  # typeshed allows it; only after close()
        raise ConfigurationError(f"shared-memory block {block.name} is closed")
    return buf


def _run(task: _Task, attached: dict[str, SharedMemory]) -> object:
    if isinstance(task, _Map):
        results = []
        for index, job in enumerate(task.jobs):
            try:
                results.append(task.function(job))
            except SecAggError as exc:  # a protocol outcome: raised as is by the pool
                return results, (index, exc)
        return results, None
    ring = Ring(task.bits)
    if isinstance(task, _Keystream):
        return raw_keystream_seconds(task.keys, task.stop - task.start, ring, offset=task.start)
    if isinstance(task, _RemoveMasks):
        _attach(attached, [task.vector])
        vector = np.ndarray((task.length,), ring.dtype, buffer=_buffer(attached[task.vector]))
        window = vector[task.start : task.stop]
        accumulate_masks(window, ring, task.add_keys, task.subtract_keys, offset=task.start)
        del vector, window  # views of the block: it can only be unmapped without them
        return 0.0
    _attach(attached, [task.vector, task.payload])
    vector = np.ndarray((task.length,), ring.dtype, buffer=_buffer(attached[task.vector]))
    payload = _buffer(attached[task.payload])[: task.payload_bytes]
    unpack_into(vector[task.start : task.stop], payload, ring, task.length, task.start)
    del vector, payload
    return 0.0


def _worker_main(conn: Connection) -> None:
    # Ctrl-C reaches the whole process group: the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    attached: dict[str, SharedMemory] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the pool closed its end
            break
        if task is None:
            break
        try:
            answer: tuple[str, object] = ("ok", _run(task, attached))
            pickle.dumps(answer)  # an answer that cannot travel is this worker's failure
        except Exception as exc:  # reported to the pool, which raises WorkerFailed
            answer = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(answer)
    _attach(attached, [])


# --- the pool -----------------------------------------------------------------------------------


def _check_total(total: RingArray, ring: Ring) -> None:
    if total.ndim != 1 or total.dtype != ring.dtype or not total.flags.c_contiguous:
        raise ConfigurationError(f"the running sum must be a contiguous 1-D {ring.dtype} array")


class ParallelSum:
    """A :class:`secagg.protocol.SumBackend` over ``workers`` processes (see the module doc).

    Calls are serialised (one session's step at a time); the processes start in the
    constructor and are reused for every call until :meth:`close`.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigurationError(f"a worker pool needs at least 1 worker, got {workers}")
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._pool: list[tuple[BaseProcess, Connection]] = []
        self._blocks: dict[str, SharedMemory] = {}
        self._closed = False
        self._start()

    # --- SumBackend -----------------------------------------------------------------------------

    def remove_masks(
        self,
        total: RingArray,
        ring: Ring,
        add_keys: Sequence[bytes],
        subtract_keys: Sequence[bytes],
    ) -> None:
        _check_total(total, ring)
        if total.size == 0:
            return
        add, subtract = tuple(add_keys), tuple(subtract_keys)
        with self._lock:
            self._check_open("mask removal")
            block = self._block("vector", total.nbytes)
            vector = np.ndarray(total.shape, ring.dtype, buffer=_buffer(block))
            try:
                np.copyto(vector, total)
                self._call(
                    "mask removal",
                    [
                        _RemoveMasks(block.name, total.size, ring.bits, a, b, add, subtract)
                        for a, b in split_ranges(total.size, self.workers)
                    ],
                )
                np.copyto(total, vector)
                vector.fill(0)  # keep no copy of the sum in the pool
            finally:
                del vector

    def add_packed(self, total: RingArray, payload: bytes, ring: Ring) -> None:
        if ring.bits == 8 * ring.dtype.itemsize:
            add_packed(total, payload, ring)
            return
        _check_total(total, ring)
        check_packed(payload, ring, total.size)  # refused before anything is added
        if total.size == 0:
            return
        with self._lock:
            self._check_open("unpacking a masked input")
            packed = self._block("payload", len(payload))
            block = self._block("vector", total.nbytes)
            _buffer(packed)[: len(payload)] = payload
            vector = np.ndarray(total.shape, ring.dtype, buffer=_buffer(block))
            try:
                self._call(
                    "unpacking a masked input",
                    [
                        _Unpack(block.name, packed.name, len(payload), total.size, ring.bits, a, b)
                        for a, b in split_ranges(total.size, self.workers, RANGE_ALIGN)
                    ],
                )
                np.add(total, vector, out=total)
            finally:
                del vector

    def map(self, function: Callable[[_Job], _Result], jobs: Sequence[_Job]) -> list[_Result]:
        """Jobs dealt round-robin to the workers (neighbouring jobs often cost alike)."""
        jobs = list(jobs)
        if not jobs:
            return []
        parts = min(self.workers, len(jobs))
        tasks: list[_Task] = [_Map(function, tuple(jobs[i::parts])) for i in range(parts)]
        with self._lock:
            answers = self._call("reconstruction", tasks)
        results: list[Any] = [None] * len(jobs)
        failures: list[tuple[int, SecAggError]] = []
        for part, answer in enumerate(answers):
            values, failure = answer
            results[part::parts] = values + results[part::parts][len(values) :]
            if failure is not None:
                failures.append((part + failure[0] * parts, failure[1]))
        if failures:  # each worker stops at its first: the earliest of those is the first
            raise min(failures, key=lambda f: f[0])[1]
        return results

    # --- measuring ------------------------------------------------------------------------------

    def keystream_seconds(self, keys: Sequence[bytes], dim: int, ring: Ring) -> float:
        """Wall time for the workers to expand their ranges of one ``dim``-element mask per key
        (AES-CTR alone, the same split as :meth:`remove_masks`): the all-core speed limit that
        benchmarks compare mask removal with."""
        tasks: list[_Task] = [
            _Keystream(tuple(keys), ring.bits, a, b) for a, b in split_ranges(dim, self.workers)
        ]
        with self._lock:
            begin = time.perf_counter()
            self._call("keystream timing", tasks)
            return time.perf_counter() - begin

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (operators and tests watch them)."""
        with self._lock:
            return [p.pid for p, _ in self._pool if p.pid is not None]

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers and unlink the shared memory; later calls raise :class:`PoolClosed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_workers(graceful=True)
            for name in list(self._blocks):
                self._drop_block(name)

    def __enter__(self) -> ParallelSum:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals (lock held) ------------------------------------------------------------------

    def _start(self) -> None:
        for i in range(self.workers):
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=_worker_main, args=(theirs,), name=f"fedsec-sum-{i}", daemon=True
            )
            process.start()
            theirs.close()
            self._pool.append((process, ours))

    def _stop_workers(self, graceful: bool) -> None:
        for process, conn in self._pool:
            if graceful and process.is_alive():
                with contextlib.suppress(OSError):  # it died meanwhile: joined below
                    conn.send(None)
            else:
                process.terminate()
        for process, conn in self._pool:
            process.join(STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._pool = []

    def _block(self, kind: str, nbytes: int) -> SharedMemory:
        block = self._blocks.get(kind)
        if block is None or block.size < nbytes:
            if block is not None:
                self._drop_block(kind)
            block = SharedMemory(create=True, size=max(nbytes, 1))
            self._blocks[kind] = block
        return block

    def _drop_block(self, kind: str) -> None:
        block = self._blocks.pop(kind)
        block.unlink()
        with contextlib.suppress(BufferError):  # a view lives on (in a traceback): unmapped with it
            block.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise PoolClosed(f"{what}: the worker pool is closed (the server is stopping)")

    def _call(self, what: str, tasks: Sequence[_Task]) -> list[Any]:
        self._check_open(what)
        if not self._pool:
            self._start()
        workers = self._pool[: len(tasks)]
        try:
            for (process, conn), task in zip(workers, tasks, strict=True):
                try:
                    conn.send(task)
                except OSError:  # its end of the pipe is gone with it
                    raise self._died(what, process) from None
            return self._gather(what, workers)
        except BaseException:
            # Other workers may still be busy with this call: start over with fresh ones.
            self._stop_workers(graceful=False)
            raise

    def _gather(self, what: str, workers: list[tuple[BaseProcess, Connection]]) -> list[Any]:
        results: list[Any] = [None] * len(workers)
        waiting = {conn: (i, process) for i, (process, conn) in enumerate(workers)}
        while waiting:
            ready = set(wait([*waiting, *(p.sentinel for _, p in waiting.values())]))
            for conn, (i, process) in list(waiting.items()):
                if conn in ready or conn.poll():
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        raise self._died(what, process) from None
                    if status != "ok":
                        raise WorkerFailed(f"{what}: worker {i} (pid {process.pid}) {value}")
                    results[i] = value
                    del waiting[conn]
                elif process.sentinel in ready:
                    raise self._died(what, process)
        return results

    @staticmethod
    def _died(what: str, process: BaseProcess) -> WorkerDied:
        process.join(STOP_GRACE_S)
        return WorkerDied(
            f"{what}: worker process {process.pid} exited (code {process.exitcode}); this "
            "session aborts and the pool starts fresh workers for the next one"
        )

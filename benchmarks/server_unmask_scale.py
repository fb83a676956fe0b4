"""Server unmasking at the scale target, on one core and on every core; prints one JSON line.

    python benchmarks/server_unmask_scale.py            # n = 1000, d = 4,194,304 (~5-10 min)
    python benchmarks/server_unmask_scale.py --quick    # n = 1000, d = 1,048,576 (~2-3 min)

d = 4,194,304 is LoRA r = 8 on the q and v projections of Llama-2-7B (32 layers x 2 matrices x
(4096 x 8 + 8 x 4096)). SecAgg+ with the neighbour degree the clients accept against an active
server (``--neighbors auto``: k = 52, t = 37 at n = 1000, 5 % colluding, 5 % dropout) or
Google's semi-honest finder (``--neighbors semi-honest``: k = 30, t = 17, clients told to assume
no collusion), ``--dropout`` of the cohort dropping after sharing their keys.

How it is measured. One real session runs in this process (``secagg.simulate``: every client
masks a distinct d-vector, a view into one shared array, so memory stays O(d)); the server uses
the worker pool (:class:`server.parallel_unmask.ParallelSum`). Its unmask stage is three parts:
the reconstructions (Shamir, key agreement with dropped clients, key derivation: one job per
secret), the mask removal, and the rest (indexing shares, building jobs; measured in that
session as the stage time minus the other two). The inputs of the first two (the jobs; the
masked sum and the keys) are recorded and replayed ``--repeats`` times, interleaved, rotating
the order:

- ``reconstruct_s`` / ``remove_masks_s``, ``one_core``: in this process (``InProcessSum``);
  ``all_cores``: on the pool (``--workers`` processes);
- ``prg_limit_s.one_core``: raw AES-CTR of the same masks (:func:`raw_keystream_seconds`);
  ``prg_limit_s.all_cores``: the same on the pool, each worker expanding its range of every mask
  (:meth:`ParallelSum.keystream_seconds`).

``server_unmask_s`` = rest + median reconstruction + median mask removal on that many cores,
and the ratios divide it (and the mask removal alone) by the AES-CTR limit of the same core
count. Every replay must give the session's keys and sum, and the session's sum must equal the
plain sum of the inputs (``exact``).

Clients: every ``n / --client-sample``-th client's masking step (copy + k + 1 masks) is paired
with raw AES-CTR of as many masks, as in ``secagg_bench.py``.

Memory: peak RSS of this process (the server, and all n clients since they run in it) and of
each worker, beside the d-vector size and what n such vectors would take.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
from _interleave import PairedClients, random_keys, ratio, spread

from secagg.params import active_quorum, secaggplus_params, session_shape
from secagg.prg import raw_keystream_seconds
from secagg.protocol import ClientPolicy, InProcessSum, RoundParams, Stage
from secagg.protocol.server import UnmaskJob, unmask_keys
from secagg.ring import Ring, RingArray
from secagg.simulate import Simulation
from server.config import default_workers
from server.parallel_unmask import ParallelSum

LLAMA2_7B_QV_R8 = 32 * 2 * (4096 * 8 + 8 * 4096)  # 4,194,304

_Job = TypeVar("_Job")
_Result = TypeVar("_Result")


class RecordingSum:
    """The session's sum backend: the pool, plus a copy of what the unmask stage gave it."""

    def __init__(self, pool: ParallelSum) -> None:
        self.pool = pool
        self.jobs: list[UnmaskJob] = []
        self.keys: list[tuple[list[bytes], list[bytes]]] = []
        self.total: RingArray | None = None
        self.add_keys: tuple[bytes, ...] = ()
        self.subtract_keys: tuple[bytes, ...] = ()
        self.map_s = self.remove_s = 0.0

    def add_packed(self, total: RingArray, payload: bytes, ring: Ring) -> None:
        self.pool.add_packed(total, payload, ring)

    def map(self, function: Callable[[_Job], _Result], jobs: Sequence[_Job]) -> list[_Result]:
        begin = time.perf_counter()
        results = self.pool.map(function, jobs)
        self.map_s = time.perf_counter() - begin
        # The session maps unmask_keys over its jobs (checked again by every replay).
        self.jobs = cast(list[UnmaskJob], list(jobs))
        self.keys = cast(list[tuple[list[bytes], list[bytes]]], list(results))
        return results

    def remove_masks(
        self,
        total: RingArray,
        ring: Ring,
        add_keys: Sequence[bytes],
        subtract_keys: Sequence[bytes],
    ) -> None:
        self.total = total.copy()
        self.add_keys, self.subtract_keys = tuple(add_keys), tuple(subtract_keys)
        begin = time.perf_counter()
        self.pool.remove_masks(total, ring, add_keys, subtract_keys)
        self.remove_s = time.perf_counter() - begin


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--dim", type=int, default=LLAMA2_7B_QV_R8)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--neighbors", choices=("auto", "semi-honest"), default="auto")
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--client-sample", type=int, default=20, help="clients paired with raw AES")
    p.add_argument("--quick", action="store_true", help="d = 2^20 and 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.dim, args.repeats = 1 << 20, 2
    return args


def _params(args: argparse.Namespace) -> tuple[RoundParams, ClientPolicy]:
    n = args.clients
    cohort = tuple(range(1, n + 1))
    if args.neighbors == "auto":
        shape = session_shape(n, 0.05, args.dropout, sparse=True)
        params = RoundParams(
            os.urandom(32),
            args.bits,
            args.dim,
            shape.threshold,
            cohort,
            shape.neighbours,
            quorum=shape.quorum,
        )
        return params, ClientPolicy(dropout_fraction=args.dropout)
    plus = secaggplus_params(n, 0.05, args.dropout)
    quorum = max(active_quorum(n, 0.0), plus.t)
    params = RoundParams(os.urandom(32), args.bits, args.dim, plus.t, cohort, plus.k, quorum=quorum)
    return params, ClientPolicy(corrupt_fraction=0.0, dropout_fraction=args.dropout)


def _worker_peak_mb(pids: Sequence[int]) -> list[float]:
    peaks = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        peaks.append(round(kb / 1024, 1))
    return peaks


def _replays(
    recorder: RecordingSum, pool: ParallelSum, ring: Ring, dim: int, repeats: int, want: RingArray
) -> tuple[dict[str, list[float]], bool]:
    """Reconstruction and mask removal on one core and on the pool, and AES-CTR on each,
    interleaved, rotating the order each repeat."""
    total = recorder.total
    assert total is not None
    add, subtract = recorder.add_keys, recorder.subtract_keys
    keys = random_keys(len(add) + len(subtract))
    names = ("rec_one", "rec_all", "one", "all", "prg_one", "prg_all")
    times: dict[str, list[float]] = {k: [] for k in names}
    exact = True

    def reconstruction(backend: InProcessSum | ParallelSum) -> Callable[[], float]:
        def run() -> float:
            nonlocal exact
            begin = time.perf_counter()
            keys = backend.map(unmask_keys, recorder.jobs)
            seconds = time.perf_counter() - begin
            exact = exact and keys == recorder.keys
            return seconds

        return run

    def removal(backend: InProcessSum | ParallelSum) -> Callable[[], float]:
        def run() -> float:
            nonlocal exact
            work = total.copy()
            begin = time.perf_counter()
            backend.remove_masks(work, ring, add, subtract)
            seconds = time.perf_counter() - begin
            exact = exact and bool(np.array_equal(ring.reduce(work), want))
            return seconds

        return run

    steps: list[tuple[str, Callable[[], float]]] = [
        ("rec_one", reconstruction(InProcessSum())),
        ("one", removal(InProcessSum())),
        ("prg_one", lambda: raw_keystream_seconds(keys, dim, ring)),
        ("rec_all", reconstruction(pool)),
        ("all", removal(pool)),
        ("prg_all", lambda: pool.keystream_seconds(keys, dim, ring)),
    ]
    for repeat in range(repeats):
        shift = repeat % len(steps)
        for name, step in steps[shift:] + steps[:shift]:
            times[name].append(step())
    return times, exact


def main() -> int:
    args = _parse()
    if args.clients < 3 or args.dim < 1 or args.workers < 1 or args.repeats < 1:
        print("need --clients >= 3, --dim >= 1, --workers >= 1, --repeats >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.dropout < 0.5 or args.client_sample < 1:
        print("need 0 <= --dropout < 0.5 and --client-sample >= 1", file=sys.stderr)
        return 2
    params, policy = _params(args)
    ring, n, dim = params.ring, args.clients, args.dim
    rng = np.random.default_rng(0)  # benchmark inputs only; nothing secret
    base = ring.reduce(rng.integers(0, 2**63, dim + n, dtype=np.uint64).astype(ring.dtype))
    inputs = {u: base[u : u + dim] for u in params.cohort}  # distinct, and O(d) memory
    dropped = set(params.cohort[:: max(1, round(1 / args.dropout))]) if args.dropout else set()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    with ParallelSum(args.workers) as pool:
        recorder = RecordingSum(pool)
        sim = Simulation(
            params,
            inputs,
            dropouts={Stage.MASKED_INPUT: dropped},
            policy=policy,
            record_masked_inputs=False,
            server_backend=recorder,
        )
        clients = PairedClients(sim, every=max(1, n // args.client_sample))
        begin = time.perf_counter()
        outcome = sim.run()
        wall = time.perf_counter() - begin
        expected = ring.zeros(dim)
        for u in outcome.result.contributors:
            np.add(expected, inputs[u], out=expected)
        exact = bool(np.array_equal(ring.reduce(expected), outcome.result.sum))
        del expected
        times, replays_exact = _replays(recorder, pool, ring, dim, args.repeats, outcome.result.sum)
        worker_peaks = _worker_peak_mb(pool.worker_pids())
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    stage_s = outcome.server_close_seconds[Stage.UNMASK.value]
    rest_s = stage_s - recorder.map_s - recorder.remove_s
    med = {name: statistics.median(values) for name, values in times.items()}
    unmask_one = rest_s + med["rec_one"] + med["one"]
    unmask_all = rest_s + med["rec_all"] + med["all"]
    client_figures, client_spreads = clients.figures()
    vector_mb = dim * ring.dtype.itemsize / 2**20
    print(
        json.dumps(
            {
                "benchmark": "server_unmask_scale",
                "clients": n,
                "dim": dim,
                "bits": args.bits,
                "neighbors": params.degree,
                "threshold": params.threshold,
                "quorum": params.signature_quorum,
                "parameters": args.neighbors,
                "dropout": args.dropout,
                "contributors": len(outcome.result.contributors),
                "workers": args.workers,
                "cpu_count": os.cpu_count(),
                "exact": exact and replays_exact,
                "server_masks_removed": len(recorder.add_keys) + len(recorder.subtract_keys),
                "server_unmask_s": {
                    "one_core": round(unmask_one, 4),
                    "all_cores": round(unmask_all, 4),
                    "all_cores_in_session": round(stage_s, 4),
                },
                "prg_limit_s": {
                    "one_core": round(med["prg_one"], 4),
                    "all_cores": round(med["prg_all"], 4),
                },
                "server_unmask_vs_prg_one_core": round(unmask_one / med["prg_one"], 3),
                "server_unmask_vs_prg_all_cores": round(unmask_all / med["prg_all"], 3),
                "reconstruct_s": {
                    "one_core": round(med["rec_one"], 4),
                    "all_cores": round(med["rec_all"], 4),
                },
                "remove_masks_s": {
                    "one_core": round(med["one"], 4),
                    "all_cores": round(med["all"], 4),
                },
                "rest_of_unmask_s": round(rest_s, 4),
                "remove_masks_vs_prg_one_core": ratio(times["one"], times["prg_one"]),
                "remove_masks_vs_prg_all_cores": ratio(times["all"], times["prg_all"]),
                "speedup_unmask": round(unmask_one / unmask_all, 3),
                "speedup_prg": round(med["prg_one"] / med["prg_all"], 3),
                **client_figures,
                "peak_rss_mb": {
                    "server_and_clients_process": round(rss_peak, 1),
                    "before_the_session": round(rss_before, 1),
                    "each_worker": worker_peaks,
                },
                "vector_mb": round(vector_mb, 1),
                "n_vectors_mb": round(n * vector_mb, 1),
                "spread": {
                    "reconstruct_one_core_s": spread(times["rec_one"], 4),
                    "reconstruct_all_cores_s": spread(times["rec_all"], 4),
                    "remove_masks_one_core_s": spread(times["one"], 4),
                    "remove_masks_all_cores_s": spread(times["all"], 4),
                    "prg_limit_one_core_s": spread(times["prg_one"], 4),
                    "prg_limit_all_cores_s": spread(times["prg_all"], 4),
                    **client_spreads,
                },
                "stage_seconds": {k: round(v, 2) for k, v in outcome.stage_seconds.items()},
                "server_stage_seconds": {
                    k: round(v, 3) for k, v in outcome.server_close_seconds.items()
                },
                "wall_s": round(wall, 1),
            }
        )
    )
    return 0 if exact and replays_exact else 1


if __name__ == "__main__":
    sys.exit(main())

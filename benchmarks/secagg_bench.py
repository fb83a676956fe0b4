"""Secure-aggregation speed against the AES-CTR limit of this machine; prints one JSON line.

    python benchmarks/secagg_bench.py --clients 100 --dim 1000000 --dropout 0.1
    python benchmarks/secagg_bench.py --clients 1000 --dim 100000 --neighbors auto --dropout 0.05

A whole session runs in one process (``secagg.simulate``) with real keys, shares and messages
through their byte encoding. Ratios compare masking with the raw AES-CTR expansion of the same
number of masks of the same length (:func:`secagg.prg.raw_keystream_seconds`), each measured
right beside the masking it is compared with, alternating which goes first, so that a shared
machine's changing load hits both alike (``benchmarks/_interleave.py``):

- ``client_mask_vs_prg``: every masking client's step (copy of x_u + every mask, the real
  ``ClientSession`` step) paired with raw AES-CTR of as many masks; ratio of the medians.
- ``server_unmask_vs_prg``: the server's whole unmask stage (Shamir reconstruction, key
  agreement with dropped clients, mask removal; ``ServerSession.close_stage``), replayed
  ``--repeats`` times on fresh sessions that received the same messages, each run paired with
  raw AES-CTR of the masks it removed; ratio of the medians.
- ``*_paired``: the median of the per-pair ratios (steadier when the load changes mid-run).
- ``*_cpu``: the same ratios in thread CPU time (what the code costs, whoever else runs): the
  server stage as above, and the client's masking step (``accumulate_masks`` over a copy of
  x_u with the median client's mask count) against raw AES-CTR, ``--repeats`` times.

``spread`` holds median, quartiles, min and max of every timing, and of the per-client ratios.
``exact`` checks the released sum (and every replay's) against the plain sum of the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from _interleave import PairedClients, ServerReplay, random_keys, ratio, spread, timed

from secagg.packing import packed_size
from secagg.params import session_shape
from secagg.prg import accumulate_masks, raw_keystream_seconds
from secagg.protocol import RoundParams, ServerSession, Stage
from secagg.ring import Ring, RingArray
from secagg.simulate import Simulation


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--dim", type=int, default=1_000_000)
    p.add_argument(
        "--neighbors",
        default="complete",
        help="'complete' (classic SecAgg), 'auto' (SecAgg+ k from n) or an integer k",
    )
    p.add_argument("--dropout", type=float, default=0.1, help="fraction dropping before input")
    p.add_argument("--bits", type=int, default=32)
    p.add_argument(
        "--repeats", type=int, default=5, help="server unmask replays and client CPU-time repeats"
    )
    return p.parse_args()


def _round_params(args: argparse.Namespace) -> RoundParams:
    n = args.clients
    cohort = tuple(range(1, n + 1))
    fraction = max(args.dropout, 0.05)
    # What every client accepts against an active server colluding with 5 % of the cohort.
    if args.neighbors == "complete":
        shape = session_shape(n, 0.05, fraction)
    elif args.neighbors == "auto":
        shape = session_shape(n, 0.05, fraction, sparse=True)
    else:
        shape = session_shape(n, 0.05, fraction, neighbours=int(args.neighbors))
    return RoundParams(
        os.urandom(32),
        args.bits,
        args.dim,
        shape.threshold,
        cohort,
        shape.neighbours,
        quorum=shape.quorum,
    )


def _server_unmask(
    replay: ServerReplay, masks: int, expected: RingArray, args: argparse.Namespace, ring: Ring
) -> tuple[dict[str, list[float]], bool]:
    """The unmask stage replayed ``repeats`` times, each beside raw AES-CTR of its masks."""
    keys = random_keys(masks)
    times: dict[str, list[float]] = {"unmask": [], "unmask_cpu": [], "prg": [], "prg_cpu": []}
    exact = True
    for repeat in range(args.repeats):
        session = replay.session()

        def unmask(session: ServerSession = session) -> None:
            wall, cpu = timed(session.close_stage)
            times["unmask"].append(wall)
            times["unmask_cpu"].append(cpu)

        def prg() -> None:
            cpu = time.thread_time()
            times["prg"].append(raw_keystream_seconds(keys, args.dim, ring))
            times["prg_cpu"].append(time.thread_time() - cpu)

        for step in (unmask, prg) if repeat % 2 == 0 else (prg, unmask):
            step()
        exact = exact and bool(np.array_equal(session.result.sum, expected))
    return times, exact


def _client_cpu(
    x: RingArray, masks: int, args: argparse.Namespace, ring: Ring
) -> dict[str, list[float]]:
    """The client's masking step against raw AES-CTR in thread CPU time, alternating."""
    keys = random_keys(masks)
    half = masks // 2
    times: dict[str, list[float]] = {"mask": [], "prg": []}
    for repeat in range(args.repeats):
        steps = [
            ("mask", lambda: accumulate_masks(x.copy(), ring, keys[:half], keys[half:])),
            ("prg", lambda: raw_keystream_seconds(keys, args.dim, ring)),
        ]
        for name, step in steps if repeat % 2 == 0 else steps[::-1]:
            times[name].append(timed(step)[1])
    return times


def main() -> int:
    args = _parse()
    if args.clients < 3 or args.dim < 1 or not 0 <= args.dropout < 0.5 or args.repeats < 1:
        print(
            "need --clients >= 3, --dim >= 1, 0 <= --dropout < 0.5, --repeats >= 1", file=sys.stderr
        )
        return 2
    params = _round_params(args)
    ring = params.ring
    rng = np.random.default_rng(0)  # benchmark inputs only; nothing secret
    inputs = {
        u: ring.reduce(rng.integers(0, 2**63, args.dim, dtype=np.uint64).astype(ring.dtype))
        for u in params.cohort
    }
    dropped = set(params.cohort[: round(args.dropout * args.clients)])
    sim = Simulation(
        params, inputs, dropouts={Stage.MASKED_INPUT: dropped}, record_masked_inputs=False
    )
    clients = PairedClients(sim)
    replay = ServerReplay(sim)
    begin = time.perf_counter()
    outcome = sim.run()
    wall = time.perf_counter() - begin

    expected = ring.zeros(args.dim)
    for u in outcome.result.contributors:
        np.add(expected, inputs[u], out=expected)
    expected = ring.reduce(expected)
    exact = bool(np.array_equal(expected, outcome.result.sum))

    client_figures, client_spreads = clients.figures()
    masks = int(client_figures["client_masks"])
    client_cpu = _client_cpu(inputs[outcome.result.contributors[0]], masks, args, ring)
    server, replays_exact = _server_unmask(replay, sim.server.masks_removed, expected, args, ring)

    uploads = [outcome.upload_bytes[u] for u in outcome.result.contributors]
    masked_sizes = [m.size for m in outcome.transcript.messages if m.kind == "MaskedInput"]
    payload = packed_size(args.bits, args.dim)
    protocol_bytes = statistics.mean(uploads) - statistics.mean(masked_sizes)
    print(
        json.dumps(
            {
                "benchmark": "secagg",
                "clients": args.clients,
                "dim": args.dim,
                "bits": args.bits,
                "neighbors": params.degree,
                "quorum": params.signature_quorum,
                "threshold": params.threshold,
                "dropout": args.dropout,
                "contributors": len(outcome.result.contributors),
                "exact": exact and replays_exact,
                **client_figures,
                "client_mask_vs_prg_cpu": ratio(client_cpu["mask"], client_cpu["prg"]),
                "client_pack_s": round(
                    statistics.median(c.pack_seconds for c in sim.clients.values() if c.mask_count),
                    5,
                ),
                "server_unmask_s": round(statistics.median(server["unmask"]), 5),
                "server_masks_removed": sim.server.masks_removed,
                "prg_limit_server_s": round(statistics.median(server["prg"]), 5),
                "server_unmask_vs_prg": ratio(server["unmask"], server["prg"]),
                "server_unmask_vs_prg_paired": round(
                    statistics.median(
                        a / b for a, b in zip(server["unmask"], server["prg"], strict=True)
                    ),
                    3,
                ),
                "server_unmask_vs_prg_cpu": ratio(server["unmask_cpu"], server["prg_cpu"]),
                "spread": {
                    **client_spreads,
                    "client_mask_cpu_s": spread(client_cpu["mask"]),
                    "prg_limit_client_cpu_s": spread(client_cpu["prg"]),
                    "server_unmask_s": spread(server["unmask"]),
                    "prg_limit_server_s": spread(server["prg"]),
                    "server_unmask_cpu_s": spread(server["unmask_cpu"]),
                    "prg_limit_server_cpu_s": spread(server["prg_cpu"]),
                },
                "upload_bytes_per_client": round(statistics.mean(uploads)),
                "packed_payload_bytes": payload,
                "key_and_share_bytes_per_client": round(protocol_bytes),
                "masked_input_vs_packed": round(statistics.mean(masked_sizes) / payload, 5),
                "stage_seconds": {k: round(v, 4) for k, v in outcome.stage_seconds.items()},
                "server_stage_seconds": {
                    k: round(v, 4) for k, v in outcome.server_close_seconds.items()
                },
                "wall_s": round(wall, 2),
                "cpu_count": os.cpu_count(),
            }
        )
    )
    return 0 if exact and replays_exact else 1


if __name__ == "__main__":
    sys.exit(main())

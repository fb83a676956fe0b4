"""Secure-aggregation speed against the AES-CTR limit of this machine; prints one JSON line.

    python benchmarks/secagg_bench.py --clients 100 --dim 1000000 --dropout 0.1
    python benchmarks/secagg_bench.py --clients 1000 --dim 100000 --neighbors auto --dropout 0.05

A whole session runs in one process (``secagg.simulate``) with real keys, shares and messages
through their byte encoding. Ratios compare masking with the raw AES-CTR expansion of the same
number of masks of the same length, measured in the same run on the same machine:

- ``client_mask_vs_prg``: median client time to build y_u (copy + every mask) divided by the
  median raw keystream time for that client's mask count;
- ``server_unmask_vs_prg``: the server's unmask stage (Shamir reconstruction, key agreement with
  dropped clients, mask removal) divided by raw expansion of the masks it removed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from secagg.packing import packed_size
from secagg.params import session_shape
from secagg.prg import raw_keystream_seconds
from secagg.protocol import RoundParams, Stage
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
    p.add_argument("--repeats", type=int, default=5, help="raw AES-CTR timing repeats")
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


def main() -> int:
    args = _parse()
    if args.clients < 3 or args.dim < 1 or not 0 <= args.dropout < 0.5:
        print("need --clients >= 3, --dim >= 1, 0 <= --dropout < 0.5", file=sys.stderr)
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
    begin = time.perf_counter()
    outcome = sim.run()
    wall = time.perf_counter() - begin

    expected = ring.zeros(args.dim)
    for u in outcome.result.contributors:
        np.add(expected, inputs[u], out=expected)
    exact = bool(np.array_equal(ring.reduce(expected), outcome.result.sum))

    masking = [c for c in sim.clients.values() if c.mask_count]
    client_mask_s = statistics.median(c.mask_seconds for c in masking)
    client_masks = int(statistics.median(c.mask_count for c in masking))
    keys = [os.urandom(16) for _ in range(max(client_masks, sim.server.masks_removed))]
    prg_client = statistics.median(
        raw_keystream_seconds(keys[:client_masks], args.dim, ring) for _ in range(args.repeats)
    )
    prg_server = statistics.median(
        raw_keystream_seconds(keys[: sim.server.masks_removed], args.dim, ring)
        for _ in range(max(1, args.repeats // 2))
    )
    server_unmask_s = outcome.server_close_seconds[Stage.UNMASK.value]

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
                "exact": exact,
                "client_mask_s": round(client_mask_s, 5),
                "client_masks": client_masks,
                "prg_limit_client_s": round(prg_client, 5),
                "client_mask_vs_prg": round(client_mask_s / prg_client, 3),
                "client_pack_s": round(statistics.median(c.pack_seconds for c in masking), 5),
                "server_unmask_s": round(server_unmask_s, 5),
                "server_masks_removed": sim.server.masks_removed,
                "prg_limit_server_s": round(prg_server, 5),
                "server_unmask_vs_prg": round(server_unmask_s / prg_server, 3),
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
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cost of one client's secret DP noise against its masking work, same process, same machine.

For a vector of ``--dim`` coordinates (default 1M) and the per-client noise the calibration
picks for the embedded federation (Skellam, stddev 3686.4 integer units: the calibration pushes
the scale until the noise reaches 0.9 x the sampler's MAX_STDDEV), times

- ``table_build_s``: building the alias table once (exact brackets on the PMF, exact
  normalisation, Vose), which a client does once per noise level and then reuses;
- ``noise_s``: ``secagg.dp.noise.add_noise`` into an int64 accumulator (table built beforehand,
  as a client reuses it for the whole run);
- ``aes_4d_s``: the raw AES-CTR keystream for 4 x dim bytes (one 32-bit word per coordinate,
  the least randomness any sampler of this kind reads);
- ``mask_s[k]``: ``secagg.prg.accumulate_masks`` with k keys into a 32-bit ring vector, the
  client's masking work (as in ``benchmarks/secagg_bench.py``) for k = 4 (the embedded
  4-institution federation), 13 (SecAgg+ at n = 100: k = 12 neighbours + the self mask, the
  realistic deployment) and 31 (SecAgg+ at n = 1000: 30 + 1).

Each figure is the median of ``--repeats`` interleaved runs after one warm-up run (the first
call pays page faults on fresh buffers, which a long-running client does not). Prints one JSON
line; ``noise_vs_mask`` per k, target <= 0.3 at the realistic k.

    .venv/bin/python benchmarks/dp_noise.py [--dim 1000000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secagg.dp.noise import AliasSampler, CsprngWords, NoiseSpec, add_noise, sampler_for
from secagg.prg import accumulate_masks
from secagg.ring import Ring

#: Per-client stddev the calibration chooses for the embedded federation (0.9 x MAX_STDDEV).
EMBEDDED_STDDEV = 3686.4
MASK_KEYS = (4, 13, 31)
REALISTIC_K = 13
TARGET = 0.3


def timed(action: Callable[[], object]) -> float:
    begin = time.perf_counter()
    action()
    return time.perf_counter() - begin


def measure(dim: int, repeats: int, stddev: float) -> dict[str, Any]:
    spec = NoiseSpec("skellam", stddev)
    build_s = timed(lambda: AliasSampler(spec))  # uncached: what sampler_for pays once
    sampler_for(spec)
    ring = Ring(32)
    acc = np.zeros(dim, dtype=np.int64)
    masked = ring.zeros(dim)
    keys = [os.urandom(16) for _ in range(max(MASK_KEYS))]
    words = np.empty(dim, dtype=np.uint32)
    actions: dict[str, Callable[[], object]] = {
        "noise": lambda: add_noise(acc, spec, CsprngWords()),
        "aes_4d": lambda: CsprngWords().fill(words),
    }

    def masking(k: int) -> Callable[[], object]:
        # Pairwise masks are added for some neighbours and subtracted for the others.
        return lambda: accumulate_masks(masked, ring, keys[: k // 2], keys[k // 2 : k])

    for k in MASK_KEYS:
        actions[f"mask_{k}"] = masking(k)
    for action in actions.values():
        action()  # warm-up: page faults, table and cipher set-up
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            samples[name].append(timed(action))
    median = {name: statistics.median(times) for name, times in samples.items()}
    noise = median["noise"]
    return {
        "table_build_s": build_s,
        "noise_s": noise,
        "noise_msamples_per_s": dim / noise / 1e6,
        "aes_4d_s": median["aes_4d"],
        "noise_vs_aes_4d": noise / median["aes_4d"],
        "mask_s": {str(k): median[f"mask_{k}"] for k in MASK_KEYS},
        "noise_vs_mask": {str(k): noise / median[f"mask_{k}"] for k in MASK_KEYS},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--stddev", type=float, default=EMBEDDED_STDDEV)
    args = parser.parse_args()
    if args.dim < 1 or args.repeats < 1:
        print("need --dim >= 1 and --repeats >= 1", file=sys.stderr)
        return 2
    figures = measure(args.dim, args.repeats, args.stddev)
    print(
        json.dumps(
            {
                "benchmark": "dp_noise",
                "dim": args.dim,
                "repeats": args.repeats,
                "mechanism": "skellam",
                "stddev": args.stddev,
                **figures,
                "realistic_k": REALISTIC_K,
                "realistic_k_why": "SecAgg+ at n=100 uses k=12 neighbours, +1 self mask",
                "noise_vs_mask_target": TARGET,
                "noise_vs_mask_target_met": figures["noise_vs_mask"][str(REALISTIC_K)] <= TARGET,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Utility of distributed DP on the embedded federated task, and the client cost of the noise.

For epsilon in {inf, 8, 4, 1} at delta = 1e-5 (over the whole run, client-level, calibrated by
:func:`secagg.dp.calibration.calibrate` for the fewest contributors a round releases), run the
embedded federation (``fedsec simulate``'s, Skellam noise under SecAgg) and report the final
mean eval loss over the domains. ``inf`` is the same federation without DP (secure aggregation
only). ``noise_vs_mask``: one client's time to draw its secret noise vector (CSPRNG alias
sampler, padded dimension) over its time to mask its input (all pairwise and self PRG
expansions), both measured in the same runs; target <= 0.3. One JSON line.

    .venv/bin/python benchmarks/dp_utility.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

import clients.defaults as defaults
from clients.simulate_cli import SimulationSpec, prepare
from fl_core.federation import DpSettings
from secagg.dp.encoder import DpParams
from secagg.dp.noise import CsprngWords, add_noise, sampler_for

EPSILONS = (math.inf, 8.0, 4.0, 1.0)
DELTA = 1e-5


def noise_seconds(params: DpParams, repeats: int = 5) -> float:
    """Mean time one client spends drawing its noise vector (the sampler table is built once
    per noise level and excluded, as a client reuses it for the whole run)."""
    sampler_for(params.noise)
    acc = np.zeros(params.encoded_dim, dtype=np.int64)
    begin = time.perf_counter()
    for _ in range(repeats):
        add_noise(acc, params.noise, CsprngWords())
    return (time.perf_counter() - begin) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--local-steps", type=int, default=defaults.LOCAL_STEPS)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 local steps")
    args = parser.parse_args()
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.local_steps)
    began = time.perf_counter()
    results: dict[str, dict[str, float | None]] = {}
    noise_s: list[float] = []
    mask_s: list[float] = []
    initial = math.nan
    for epsilon in EPSILONS:
        dp = None if math.isinf(epsilon) else DpSettings(epsilon, DELTA, defaults.DP_CLIP)
        spec = SimulationSpec(defaults.INSTITUTIONS, rounds, steps, dp=dp)
        fed, trainer = prepare(spec)
        if math.isnan(initial):
            initial = float(np.mean(list(trainer.evaluate(fed.global_vector).values())))
        outcomes = fed.run()
        entry: dict[str, float | None] = {
            "eval_loss_mean": outcomes[-1].metrics.eval_loss_mean,
            "noise_multiplier": None,
            "noise_std_over_clip": None,
            "epsilon_achieved": None,
        }
        if fed.calibration is not None:
            # Masks of the DP runs: the same padded dimension as the noise vector.
            mask_s += [o.metrics.client_mask_s for o in outcomes]
            noise_s.append(noise_seconds(fed.calibration.params))
            entry["noise_multiplier"] = fed.calibration.noise_multiplier
            entry["noise_std_over_clip"] = fed.calibration.noise_std_over_clip
            entry["epsilon_achieved"] = fed.calibration.epsilon
        results["inf" if math.isinf(epsilon) else f"{epsilon:g}"] = entry
    noise = float(np.mean(noise_s))
    mask = float(np.mean(mask_s))
    print(
        json.dumps(
            {
                "benchmark": "dp_utility",
                "quick": args.quick,
                "institutions": defaults.INSTITUTIONS,
                "rounds": rounds,
                "local_steps": steps,
                "delta": DELTA,
                "dp_clip": defaults.DP_CLIP,
                "mechanism": "skellam",
                "initial_eval_loss_mean": initial,
                "by_epsilon": results,
                "eval_loss": {k: v["eval_loss_mean"] for k, v in results.items()},
                "noise_s_per_client": noise,
                "mask_s_per_client": mask,
                "noise_vs_mask": noise / mask,
                "noise_vs_mask_target_met": noise / mask <= 0.3,
                "wall_s": time.perf_counter() - began,
            }
        )
    )


if __name__ == "__main__":
    main()

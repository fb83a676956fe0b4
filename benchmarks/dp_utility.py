"""Utility of distributed DP on the embedded federated task, and where it starts to pay.

For epsilon in {inf, 8, 4, 1} at delta = 1e-5 (over the whole run against the server,
client-level with zero-out adjacency and no amplification by sampling, calibrated by
:func:`secagg.dp.calibration.calibrate` for the fewest contributors a round may release: the
federation's release floor max(t, cohort - ceil(5% of the cohort)), which server and clients
enforce), run each *setting* below (Skellam noise under SecAgg, every institution in every
round) and report the final mean eval loss over the four domains' test sets. ``inf`` is the same
federation without DP (secure aggregation only); it runs first and sets the setting's L2 clip C
for the cohort settings' DP runs to the median norm of its first-round client updates
(``dp_clip``; a clip far below the updates' norm wastes them, one far above wastes noise; the
embedded setting keeps the default clip, as its 4 contributors' noise swamps any update and
grows with C: see ``dp_clip_source``).

Settings (the synthetic institutions of :mod:`clients.synthetic`, cycling its four domains):

- ``embedded``: the issue's figures, ``fedsec simulate``'s default (4 institutions, LoRA rank 8
  on every projection and the LM head, ~26k trained coordinates).
- ``cohort``: what a privacy officer can change to make DP pay: many more institutions (128;
  the noise of the *sum* is fixed by epsilon, so the mean's noise falls with the contributor
  count) each doing fewer local steps, and far fewer trained coordinates (FFA-LoRA, rank 2, on
  the LM head and the q/v projections, ~2k: the noise's norm grows as sqrt(dim) while the
  clipped update's does not).
- ``cohort_full_lora``: the same 128 institutions and schedule with the default adapter, to
  separate the two effects.

``noise_std_over_clip`` is the calibration's central noise std per coordinate of the decoded
sum over the clip norm, for the fewest contributors (divide by the contributor count for the
mean); ``mean_noise_norm_over_clip`` = that x sqrt(dim) / contributors, the noise's L2 norm in
the averaged update relative to one clipped update. ``noise_vs_mask``: one client's time to
draw its noise vector (warm, median of repeats) over its mean masking time measured in the DP
runs of the same setting; see ``benchmarks/dp_noise.py`` for the controlled comparison at
d = 1M. One JSON line on stdout, progress on stderr.

    .venv/bin/python benchmarks/dp_utility.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

import clients.defaults as defaults
from clients.simulation import TorchTrainer, default_clip
from clients.trainer import LoraMode, LoraSettings, TrainSettings, evaluate
from clients.workload import SimulationSpec, Workload, build_workload
from fl_core.federation import (
    ClientUpdate,
    DpSettings,
    Federation,
    FederationConfig,
    FederationConfigError,
    RoundOutcome,
    SecAggSettings,
)
from fl_core.strategies import ClientOptions
from secagg.dp.encoder import DpParams
from secagg.dp.noise import CsprngWords, add_noise, sampler_for

EPSILONS = (math.inf, 8.0, 4.0, 1.0)
DELTA = 1e-5
TARGET = 0.3
CLIP_SOURCE = (
    "embedded: the default DP clip; cohort settings: the median L2 norm of the first-round "
    "client updates of the setting's eps=inf run (data-dependent and not charged to the "
    "privacy budget: on real data pick C on public proxy data or with adaptive clipping)"
)


@dataclass(frozen=True)
class Setting:
    institutions: int
    rounds: int
    local_steps: int
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    mode: LoraMode
    lr: float
    #: The DP runs' L2 clip; None: the median first-round update norm of the eps = inf run.
    dp_clip: float | None


SETTINGS = {
    "embedded": Setting(
        institutions=defaults.INSTITUTIONS,
        rounds=defaults.ROUNDS,
        local_steps=defaults.LOCAL_STEPS,
        rank=defaults.LORA_RANK,
        alpha=defaults.LORA_ALPHA,
        target_modules=LoraSettings().targets,
        mode=defaults.LORA_MODE,
        lr=defaults.LR,
        # With 4 contributors the noise swamps any update, and it grows with C: the default.
        dp_clip=defaults.DP_CLIP,
    ),
    # Many institutions, fewer steps each, and ~2k trained coordinates instead of ~26k:
    # FFA-LoRA (exact secure average) rank 2 on the LM head and q/v; alpha / rank = 2 as in the
    # default. lr 0.1: at 64 institutions x 3 rounds x 3 steps without DP, FFA reached eval
    # 7.68 / 6.94 / 6.14 at lr 0.03 / 0.1 / 0.3 from 7.94 (0.3 clips far harder under DP).
    "cohort": Setting(
        institutions=128,
        rounds=5,
        local_steps=3,
        rank=2,
        alpha=4,
        target_modules=("lm_head", "q_proj", "v_proj"),
        mode="ffa",
        lr=0.1,
        dp_clip=None,
    ),
    # The same cohort and schedule with the embedded default adapter: the cohort's effect alone.
    "cohort_full_lora": Setting(
        institutions=128,
        rounds=5,
        local_steps=3,
        rank=defaults.LORA_RANK,
        alpha=defaults.LORA_ALPHA,
        target_modules=LoraSettings().targets,
        mode=defaults.LORA_MODE,
        lr=defaults.LR,
        dp_clip=None,
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def workload(setting: Setting) -> tuple[Workload, np.ndarray]:
    lora = LoraSettings(
        rank=setting.rank,
        alpha=setting.alpha,
        targets=setting.target_modules,
        mode=setting.mode,
        init_seed=defaults.SEED,
    )
    # eval_records=1: the institutions' own held-out sets are not used here (see federation()).
    spec = SimulationSpec(setting.institutions, seed=defaults.SEED, eval_records=1)
    work = build_workload(spec, lora)
    return work, work.lm.get_vector().copy()


@dataclass
class NormRecorder(TorchTrainer):
    """The trainer, also keeping the L2 norm of every first-round update (to pick the clip)."""

    first_round_norms: list[float] = field(default_factory=list)

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        update = super().train(client, round_index, global_vector, options)
        if round_index == 0:
            self.first_round_norms.append(float(np.linalg.norm(update.delta)))
        return update


def clip_from(norms: list[float]) -> float:
    """The median update norm, to two significant digits."""
    median = statistics.median(norms)
    return float(f"{median:.2g}")


def federation(
    setting: Setting, work: Workload, initial: np.ndarray, dp: DpSettings | None
) -> tuple[Federation, NormRecorder]:
    """A fresh federation from the same initial adapter (the workload is shared across runs:
    local training starts from the global vector it is given, so no state carries over)."""
    settings = TrainSettings(
        local_steps=setting.local_steps,
        batch_size=defaults.BATCH_SIZE,
        lr=setting.lr,
        seed=defaults.SEED,
        # One thread: clients train in turn, and on a shared 2-core machine two OpenMP threads
        # per step spin against other processes (measured 2 s/step vs 0.03 s/step).
        num_threads=1,
    )
    trainer = NormRecorder(work, settings, defaults.SEED)
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=setting.rounds,
        secagg=SecAggSettings(clip=default_clip(settings, defaults.STRATEGY)),
        strategy=defaults.STRATEGY,
        dp=dp,
        seed=defaults.SEED,
    )
    max_samples = max(len(d) for d in work.train_sets.values())

    # Scored on the domains' held-out sets (their union weighs every domain alike), as before
    # the simulation scored each institution on its own set.
    def score(vector: np.ndarray) -> dict[str, float]:
        return evaluate(work.lm, vector, work.domain_sets, work.pad_id)

    return Federation(config, trainer, score, initial, max_samples), trainer


def noise_seconds(params: DpParams, repeats: int = 7) -> float:
    """Median time one client spends drawing its noise vector, after a warm-up call (the table
    is built once per noise level and a long-running client's buffers are already mapped)."""
    sampler_for(params.noise)
    acc = np.zeros(params.encoded_dim, dtype=np.int64)
    add_noise(acc, params.noise, CsprngWords())
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        add_noise(acc, params.noise, CsprngWords())
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def run_setting(name: str, setting: Setting, began: float) -> dict[str, Any]:
    work, initial = workload(setting)
    initial_loss = math.nan
    by_epsilon: dict[str, dict[str, Any]] = {}
    noise_s: list[float] = []
    mask_s: list[float] = []
    graph: dict[str, Any] = {}
    clip = math.nan if setting.dp_clip is None else setting.dp_clip  # else: the eps=inf run's
    norms: list[float] = []
    for epsilon in EPSILONS:
        dp = None if math.isinf(epsilon) else DpSettings(epsilon, DELTA, clip)
        label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
        try:
            fed, trainer = federation(setting, work, initial, dp)
        except FederationConfigError as exc:
            log(f"{name} eps={label}: {exc}")
            by_epsilon[label] = {"eval_loss_mean": None, "error": str(exc)}
            continue
        if math.isnan(initial_loss):
            initial_loss = float(np.mean(list(fed.evaluator(initial).values())))
        graph = {"threshold": fed.graph.threshold, "neighbours": fed.graph.neighbours}

        def progress(o: RoundOutcome, label: str = label) -> None:
            log(
                f"[{time.perf_counter() - began:6.0f}s] {name} eps={label} round "
                f"{o.metrics.round + 1}/{setting.rounds} eval {o.metrics.eval_loss_mean:.3f} "
                f"(train {o.metrics.train_s:.0f}s, aggregation {o.metrics.aggregation_s:.0f}s)"
            )

        outcomes = fed.run(progress)
        if dp is None:
            norms = trainer.first_round_norms
            if setting.dp_clip is None:
                clip = clip_from(norms)
        entry: dict[str, Any] = {"eval_loss_mean": outcomes[-1].metrics.eval_loss_mean}
        cal = fed.calibration
        if cal is not None:
            mask_s += [o.metrics.client_mask_s for o in outcomes]
            noise_s.append(noise_seconds(cal.params))
            entry.update(
                epsilon_achieved=cal.epsilon,
                noise_multiplier=cal.noise_multiplier,
                noise_std_over_clip=cal.noise_std_over_clip,
                min_contributors=cal.min_contributors,
                mean_noise_norm_over_clip=cal.noise_std_over_clip
                * math.sqrt(fed.dim)
                / cal.min_contributors,
                local_stddev=cal.params.noise.stddev,
                encoded_dim=cal.params.encoded_dim,
            )
        by_epsilon[label] = entry
    noise = statistics.mean(noise_s) if noise_s else math.nan  # nan: no DP run was feasible
    mask = statistics.mean(mask_s) if mask_s else math.nan
    return {
        "institutions": setting.institutions,
        "rounds": setting.rounds,
        "local_steps": setting.local_steps,
        "lora": {
            "rank": setting.rank,
            "alpha": setting.alpha,
            "mode": setting.mode,
            "target_modules": list(setting.target_modules),
        },
        "lr": setting.lr,
        "trained_dim": int(initial.size),
        **graph,
        "update_norm_median": statistics.median(norms),
        "update_norm_p10_p90": [float(np.percentile(norms, 10)), float(np.percentile(norms, 90))],
        "dp_clip": clip,
        "initial_eval_loss_mean": initial_loss,
        "by_epsilon": by_epsilon,
        "eval_loss": {k: v["eval_loss_mean"] for k, v in by_epsilon.items()},
        "noise_s_per_client": noise,
        "mask_s_per_client": mask,
        "noise_vs_mask": noise / mask,
        "wall_s": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 local steps")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # evaluation too (see federation())
    began = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for name in args.settings:
        setting = SETTINGS[name]
        if args.quick:
            setting = replace(setting, rounds=2, local_steps=2)
        log(f"[{time.perf_counter() - began:6.0f}s] setting {name}: {setting}")
        results[name] = run_setting(name, setting, began)
    print(
        json.dumps(
            {
                "benchmark": "dp_utility",
                "quick": args.quick,
                "delta": DELTA,
                "dp_clip_source": CLIP_SOURCE,
                "mechanism": "skellam",
                "settings": results,
                "noise_vs_mask_target": TARGET,
                "wall_s": time.perf_counter() - began,
            }
        )
    )


if __name__ == "__main__":
    main()

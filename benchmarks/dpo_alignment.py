"""Federated DPO on the embedded preference task vs each institution aligning alone: one JSON line.

``fedsec simulate --stage sft+dpo``'s own workload (:func:`clients.simulation.prepare`): the
embedded institutions first instruction-tune together (``--sft-rounds`` rounds), then align with
DPO on their private preference pairs (``--dpo-rounds`` rounds, :mod:`clients.dpo`), every round
under secure aggregation (``--backend``). From the adapter the DPO stage starts at, each
institution then also aligns **alone** on its own pairs with the same compute (the same rounds of
the same local steps, lr schedule, beta and reference), as if it had left the federation after
instruction tuning.

Every arm is scored on each institution's own held-out pairs (drawn like its training pairs, from
phrasings no training pair uses), against the adapter the stage started from: preference accuracy
(the share of pairs whose chosen answer's log-ratio beats the rejected one's, ties one half, so
0.5 at the start) and reward margin. Beside them: each institution's held-out SFT loss at the
stage's start and end (alignment must not wreck instruction tuning), and, for every round, the
largest difference between the secure and the plaintext aggregate over its bound.

``federated_lead``: per institution, the federated adapter's accuracy minus the isolated arm's,
both at the end (the same compute and no stopping rule for either), as the mean over the seeds
with a 95% interval from a paired bootstrap over seeds and held-out pairs; ``federated_verdict``
says ``wins``/``trails`` when that interval excludes 0, else ``tie``, and
``federated_beats_isolated_every_institution`` is true when every institution's verdict is
``wins``.

``--adapt-rounds K`` adds a third arm, local adaptation (Yu et al., "Salvaging Federated
Learning by Local Adaptation", 2020): the federation's adapter K DPO rounds before the end,
after which each institution trains those last K rounds alone on its own pairs, the same compute
again; ``adapted_lead``/``adapted_verdict`` compare it with the isolated arm as above.

``isolated.accuracy_best`` is the isolated arm at its best round on the test pairs
themselves (an oracle stopping rule that favours it) and ``federated_lead_over_best`` the lead
over that (mean, min and max over the seeds). ``*_accuracy_by_kind``: the accuracies split by
what the rejected answer broke. The step norms (``federated_step_norm_by_round``,
``isolated.step_norm_by_round``) show how far each round moves the adapter: the federated step is
the mean of the institutions' updates, which point mostly in different directions (each domain's
pairs sit almost only at its own institution), so it is shorter than an institution's own step at
the same lr.

    .venv/bin/python benchmarks/dpo_alignment.py [--sft-rounds 8] [--dpo-rounds 4]
        [--institutions 4] [--pairs 64] [--eval-pairs 512] [--seeds 0,1] [--backend masking|ckks]
        [--adapt-rounds K] [--dpo-lr X] [--dpo-beta X] [--dpo-reference round|sft] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from clients import defaults
from clients.dpo import DpoSettings, pair_logps, pair_outcomes, score_preferences, train_dpo
from clients.simulation import POOLED, TorchTrainer, prepare
from clients.synthetic import make_preferences
from clients.trainer import evaluate
from clients.workload import SimulationSpec
from fl_core import recipe as recipes
from fl_core.aggregation import BACKENDS


def held_out_outcomes(trainer: TorchTrainer, name: str, vector: np.ndarray) -> np.ndarray:
    """Per held-out pair of ``name``: whether ``vector`` ranks it right against the adapter the
    stage started from (1, a tie 0.5, 0; :func:`clients.dpo.pair_outcomes`)."""
    work, start = trainer.work, trainer.dpo_start
    assert start is not None
    pairs = work.pair_test[name]
    return pair_outcomes(
        pair_logps(work.lm, vector, pairs, work.pad_id),
        pair_logps(work.lm, start, pairs, work.pad_id),
    )


def accuracy_by_kind(outcomes: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    """Preference accuracy split by what the rejected answer broke: a domain rule (``rule``) or
    an entity's fact (``fact``)."""
    if len(outcomes) != len(kinds):
        raise SystemExit(f"{len(outcomes)} held-out pairs, {len(kinds)} kinds")
    labels = np.array(kinds)
    return {k: float(np.mean(outcomes[labels == k])) for k in sorted(set(kinds))}


def lead_interval(
    differences: Sequence[np.ndarray], resamples: int = 4000, seed: int = 0
) -> dict[str, float]:
    """The mean of per-pair differences (federated minus alone, one array per run seed), with a
    95% interval from a two-level bootstrap: run seeds with replacement, then held-out pairs
    within each (both arms are scored on the same pairs, so the comparison is paired)."""
    rng = np.random.default_rng(seed)  # resampling only: nothing secret
    per_seed = np.stack(
        [d[rng.integers(len(d), size=(resamples, len(d)))].mean(axis=1) for d in differences]
    )
    picked = rng.integers(len(differences), size=(resamples, len(differences)))
    means = per_seed[picked, np.arange(resamples)[:, None]].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    mean = float(np.mean([d.mean() for d in differences]))
    return {"mean": round(mean, 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def verdict(interval: dict[str, float]) -> str:
    """``wins``/``trails`` when the 95% interval of the lead excludes 0, else ``tie``."""
    return "wins" if interval["low"] > 0 else "trails" if interval["high"] < 0 else "tie"


def _ratio(diff: float, bound: float) -> float:
    return diff / bound if bound > 0 else (0.0 if diff == 0 else float("inf"))


def isolated_arm(
    trainer: TorchTrainer,
    name: str,
    first_round: int,
    vector: np.ndarray,
    drawn: int,
    kinds: Sequence[str],
    sft_start: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """``name`` trains alone on its own pairs from ``vector``, rounds ``first_round`` to the
    stage's end with the federation's local steps, lr schedule, beta and reference, its pair
    order continuing after its first ``drawn`` batches. Returns its scores and its per-pair
    outcomes at the end."""
    recipe, work = trainer.recipe, trainer.work
    assert recipe is not None and trainer.rounds is not None and trainer.dpo_start is not None
    start = trainer.dpo_start
    index = sorted(work.train_sets).index(name)
    dpo = DpoSettings.from_recipe(recipe)
    reference = start if recipe.dpo_reference == "sft" else None
    scores_ref = pair_logps(work.lm, start, work.pair_test[name], work.pad_id)
    by_round, steps = [], []
    policy = scores_ref  # replaced every round; there is at least one
    for r in range(first_round, trainer.rounds):
        settings = replace(
            trainer.settings,
            lr=recipe.lr_at(r, trainer.rounds),
            seed=trainer.seed * 1_000_003 + index,
            data_offset=drawn,
        )
        result = train_dpo(
            work.lm,
            vector,
            work.pair_train[name],
            settings,
            dpo,
            work.pad_id,
            reference,
        )
        drawn += result.steps
        vector = vector + result.delta
        steps.append(round(float(np.linalg.norm(result.delta)), 4))
        policy = pair_logps(work.lm, vector, work.pair_test[name], work.pad_id)
        by_round.append(score_preferences(policy, scores_ref, recipe.dpo_beta))
    sft_loss = evaluate(work.lm, vector, {name: work.test_sets[name]}, work.pad_id)[name]
    best = max(range(len(by_round)), key=lambda i: by_round[i].accuracy)
    outcomes = pair_outcomes(policy, scores_ref)  # the last round's, at the end
    return {
        "accuracy": by_round[-1].accuracy,
        "margin": round(by_round[-1].margin, 4),
        "accuracy_best": by_round[best].accuracy,
        "best_round": first_round + best,
        "accuracy_by_round": [s.accuracy for s in by_round],
        "step_norm_by_round": steps,
        "accuracy_by_kind": accuracy_by_kind(outcomes, kinds),
        "sft_loss_end": round(sft_loss, 4),
        "sft_loss_change": round((sft_loss - sft_start) / sft_start, 4),
    }, outcomes


def run_seed(
    args: argparse.Namespace, seed: int
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """One run: its record, and per institution the per-pair outcomes of each arm at the end
    (``federated``, ``isolated``, and with ``--adapt-rounds`` ``adapted``)."""
    rounds = args.sft_rounds + args.dpo_rounds
    overrides: dict[str, Any] = {
        "stage": "sft+dpo",
        "dpo_rounds": args.dpo_rounds,
        "local_steps": args.local_steps,
    }
    for key in ("dpo_lr", "dpo_beta", "dpo_reference", "dpo_loss"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    recipe = recipes.resolve("embedded", overrides).recipe
    spec = SimulationSpec(
        institutions=args.institutions,
        rounds=rounds,
        recipe=recipe,
        seed=seed,
        backend=args.backend,
        records=args.records,
        pairs=args.pairs,
        eval_pairs=args.eval_pairs,
        generate=0,
    )
    # The same draw as the run's own held-out pairs: what each pair's rejected answer broke.
    kinds = make_preferences(
        args.institutions, args.pairs, args.eval_pairs, defaults.OWN_DOMAIN_SHARE, seed
    ).test_kinds
    began = time.perf_counter()
    fed, trainer = prepare(spec)
    work = trainer.work
    names = sorted(work.train_sets)
    ratios, pooled_accuracy, step_norms = [], [], []
    sft_start: dict[str, float] = {}
    scores: dict[str, Any] = {}
    adapt_from, adapt_drawn = fed.global_vector, dict(trainer.pair_batches_drawn)
    for r in range(rounds):
        before = fed.global_vector.copy()
        outcome = fed.run_round(r)
        m = outcome.metrics
        ratios.append(round(_ratio(m.secure_vs_plain_max_abs_diff, m.quantization_bound), 4))
        if r + 1 == args.sft_rounds:
            trainer.begin_dpo(outcome.global_vector)
            sft_start = dict(m.eval_loss)
        if r + 1 > args.sft_rounds:
            scores = trainer.preference_scores(outcome.global_vector)
            pooled_accuracy.append(scores[POOLED].accuracy)
            step_norms.append(round(float(np.linalg.norm(outcome.global_vector - before)), 4))
        if r + 1 == rounds - args.adapt_rounds:
            adapt_from = outcome.global_vector.copy()
            adapt_drawn = dict(trainer.pair_batches_drawn)
    sft_end = dict(fed.evaluator(fed.global_vector))
    federated_s = time.perf_counter() - began
    fed_outcomes = {n: held_out_outcomes(trainer, n, fed.global_vector) for n in names}
    federated = {
        n: {
            "accuracy": scores[n].accuracy,
            "margin": round(scores[n].margin, 4),
            "logp_accuracy": scores[n].logp_accuracy,
            "sft_loss_start": round(sft_start[n], 4),
            "sft_loss_end": round(sft_end[n], 4),
            "sft_loss_change": round((sft_end[n] - sft_start[n]) / sft_start[n], 4),
            "accuracy_by_kind": accuracy_by_kind(fed_outcomes[n], kinds[n]),
        }
        for n in names
    }
    assert trainer.dpo_start is not None
    isolated, adapted = {}, {}
    outcomes: dict[str, dict[str, np.ndarray]] = {n: {"federated": fed_outcomes[n]} for n in names}
    for n in names:
        isolated[n], outcomes[n]["isolated"] = isolated_arm(
            trainer, n, args.sft_rounds, trainer.dpo_start, 0, kinds[n], sft_start[n]
        )
        if args.adapt_rounds:
            adapted[n], outcomes[n]["adapted"] = isolated_arm(
                trainer,
                n,
                rounds - args.adapt_rounds,
                adapt_from,
                adapt_drawn.get(n, 0),
                kinds[n],
                sft_start[n],
            )
    dpo_ratios = ratios[args.sft_rounds :]
    record = {
        "seed": seed,
        "federated": federated,
        "federated_pooled_accuracy_by_round": pooled_accuracy,
        "federated_step_norm_by_round": step_norms,
        "isolated": isolated,
        **({"adapted": adapted} if args.adapt_rounds else {}),
        "sft_loss_max_abs_change": max(abs(f["sft_loss_change"]) for f in federated.values()),
        "secure_vs_plain_over_bound_by_round": ratios,
        "secure_vs_plain_within_bound_every_dpo_round": all(x <= 1.0 for x in dpo_ratios),
        "federated_s": round(federated_s, 1),
        "wall_s": round(time.perf_counter() - began, 1),
    }
    return record, outcomes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=defaults.INSTITUTIONS)
    parser.add_argument("--sft-rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--dpo-rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=defaults.LOCAL_STEPS)
    parser.add_argument("--records", type=int, default=defaults.RECORDS_PER_INSTITUTION)
    parser.add_argument("--pairs", type=int, default=defaults.PAIRS_PER_INSTITUTION)
    parser.add_argument("--eval-pairs", type=int, default=512)
    parser.add_argument(
        "--adapt-rounds",
        type=int,
        default=0,
        help="also score a federation that stops K DPO rounds early, each institution then "
        "training those K rounds alone from its adapter (the same compute as the other arms)",
    )
    parser.add_argument("--dpo-lr", type=float, default=None)
    parser.add_argument("--dpo-beta", type=float, default=None)
    parser.add_argument("--dpo-reference", choices=("round", "sft"), default=None)
    parser.add_argument("--dpo-loss", choices=("sigmoid", "ipo"), default=None)
    parser.add_argument("--backend", choices=BACKENDS, default="masking")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny run (checks the script)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sft_rounds, args.dpo_rounds, args.local_steps = 1, 2, 2
        args.records, args.pairs, args.eval_pairs = 16, 8, 8
    if not 0 <= args.adapt_rounds < args.dpo_rounds:
        parser.error(f"--adapt-rounds must be in [0, --dpo-rounds) = [0, {args.dpo_rounds})")
    torch.set_num_threads(args.threads)
    done = [run_seed(args, int(s)) for s in args.seeds.split(",")]
    runs = [record for record, _ in done]
    names = sorted(runs[0]["federated"])

    # Per institution, the paired lead at the end (no stopping rule for either arm).
    def paired(arm: str) -> dict[str, dict[str, float]]:
        """Per institution: ``arm`` minus the isolated arm, per held-out pair, over the seeds."""
        return {n: lead_interval([o[n][arm] - o[n]["isolated"] for _, o in done]) for n in names}

    interval = paired("federated")

    def mean(arm: str, key: str) -> dict[str, float]:
        """Per institution: ``key`` of ``arm``, the mean over the seeds."""
        return {n: round(float(np.mean([r[arm][n][key] for r in runs])), 4) for n in names}

    def by_kind(arm: str) -> dict[str, dict[str, float]]:
        """Per institution and kind of pair: ``arm``'s final accuracy, the mean over the seeds."""
        return {
            n: {
                k: round(float(np.mean([r[arm][n]["accuracy_by_kind"][k] for r in runs])), 4)
                for k in runs[0][arm][n]["accuracy_by_kind"]
            }
            for n in names
        }

    def lead_over_best() -> dict[str, dict[str, float]]:
        """Per institution: federated accuracy minus the alone arm's at its best round (an oracle
        stopping rule in its favour), mean, min and max over the seeds."""
        out = {}
        for n in names:
            d = [r["federated"][n]["accuracy"] - r["isolated"][n]["accuracy_best"] for r in runs]
            out[n] = {"mean": round(float(np.mean(d)), 4), "min": round(min(d), 4),
                      "max": round(max(d), 4)}  # fmt: skip
        return out

    def adapted_summary(lead: dict[str, dict[str, float]]) -> dict[str, Any]:
        return {
            "adapt_rounds": args.adapt_rounds,
            "adapted_accuracy": mean("adapted", "accuracy"),
            "adapted_lead": lead,
            "adapted_verdict": {n: verdict(lead[n]) for n in names},
            "adapted_accuracy_by_kind": by_kind("adapted"),
            "adapted_sft_loss_change": mean("adapted", "sft_loss_change"),
        }

    recipe = recipes.resolve("embedded", {"stage": "sft+dpo", "dpo_rounds": args.dpo_rounds}).recipe
    result = {
        "benchmark": "dpo_alignment",
        "config": {
            "institutions": args.institutions,
            "sft_rounds": args.sft_rounds,
            "dpo_rounds": args.dpo_rounds,
            "local_steps": args.local_steps,
            "pairs": args.pairs,
            "eval_pairs": args.eval_pairs,
            "dpo_lr": args.dpo_lr or recipe.dpo_lr,
            "dpo_beta": args.dpo_beta or recipe.dpo_beta,
            "dpo_reference": args.dpo_reference or recipe.dpo_reference,
            "dpo_loss": args.dpo_loss or recipe.dpo_loss,
            "backend": args.backend,
            "seeds": [r["seed"] for r in runs],
        },
        "federated_accuracy": mean("federated", "accuracy"),
        "isolated_accuracy": mean("isolated", "accuracy"),
        "isolated_accuracy_best": mean("isolated", "accuracy_best"),
        "federated_lead": interval,
        "federated_verdict": {n: verdict(interval[n]) for n in names},
        "federated_lead_over_best": lead_over_best(),
        **(adapted_summary(paired("adapted")) if args.adapt_rounds else {}),
        "federated_accuracy_by_kind": by_kind("federated"),
        "isolated_accuracy_by_kind": by_kind("isolated"),
        "sft_loss_change": mean("federated", "sft_loss_change"),
        "isolated_sft_loss_change": mean("isolated", "sft_loss_change"),
        "federated_beats_isolated_every_institution": all(
            verdict(interval[n]) == "wins" for n in names
        ),
        "secure_vs_plain_within_bound_every_dpo_round": all(
            r["secure_vs_plain_within_bound_every_dpo_round"] for r in runs
        ),
        "runs": runs,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""``fedsec simulate``: a whole federation in one process, with secure aggregation on every round.

Without flags it runs the embedded default (:mod:`clients.defaults`): the synthetic non-IID
institutions of :mod:`clients.synthetic` on the tiny seeded Llama of
:mod:`clients.model_factory`. ``--model`` swaps in a named pretrained model (``smollm2-135m``,
an optional extra) or any local causal LM directory (its own tokenizer and chat template);
``--data`` the institutions' own files, or one file split into institutions with
``--partition`` (:mod:`clients.local_data`); ``--backend ckks`` aggregates with CKKS homomorphic
encryption instead of pairwise masking (:mod:`fl_core.aggregation`; no DP with it). The training
recipe (LoRA shape, batch, lr and schedule, local steps, device, strategy...) is one
:class:`fl_core.recipe.Recipe`, whose flags are listed under ``--help``; its defaults depend on
the base model. The federation itself is :class:`fl_core.federation.Federation`, built with
the institutions' local training by :func:`clients.simulation.prepare` from a
:class:`clients.workload.SimulationSpec` (this module parses the flags into one); this module
reports progress, scores generation and writes the run directory, which ``--resume RUN_DIR``
continues after an interruption.

Every institution is scored on its own held-out set, besides the pooled one (their union), and
answers a few held-out questions by generation before and after training (exact match and
ROUGE-L beside the loss).

``--stage dpo`` or ``sft+dpo`` (a recipe field) aligns the model with DPO on each institution's
private preference pairs (:mod:`clients.dpo`): the embedded task's own pairs
(:func:`clients.synthetic.make_preferences`), or ``--preference-data`` (a folder of files or one
file split like ``--data``; without ``--data``, the SFT stage trains on the chosen answers). DPO
updates go through the same strategy, encoding and secure aggregation as SFT updates. From the
DPO stage's start on, every round also scores each institution's held-out pairs (preference
accuracy and reward margin against the adapter the stage started from) beside the SFT eval
loss, which alignment must not wreck.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

import clients.defaults as defaults
from clients.data import (
    ChatTemplateUse,
    Example,
)
from clients.devices import DeviceError
from clients.dpo import (
    DpoConfigError,
    PreferenceScore,
)
from clients.errors import (
    ChatTemplateError,
    DataFormatError,
    EmptyDatasetError,
    ModelLoadError,
    WorkloadError,
)
from clients.generation import GenerationScore, answer_questions
from clients.lora_targets import LoraTargetError
from clients.model_factory import (
    ModelSource,
    model_source,
    save_base,
)
from clients.partition import SCHEMES, PartitionError, PartitionSpec
from clients.simulation import (
    POOLED,
    SplitRunTrainer,
    TorchTrainer,
    dp_advice,
    prepare,
)
from clients.split import cli as split_cli
from clients.trainer import (
    TrainingConfigError,
)
from clients.workload import SimulationSpec, Workload
from fl_core import recipe as recipes
from fl_core.aggregation import BACKENDS
from fl_core.cli import UsageError
from fl_core.dp_guidance import NoiseGuidance
from fl_core.errors import FLError
from fl_core.federation import (
    DpSettings,
    Federation,
    FederationConfigError,
    RoundMetrics,
    RoundOutcome,
    check_backend,
)
from fl_core.recipe import Recipe, RecipeError
from fl_core.run_dir import (
    BASE_DIR,
    INITIAL_FILE,
    RunDirectoryError,
    RunState,
    RunWriter,
    load_state,
    save_state,
)
from fl_core.split import WHAT_THE_SERVER_SEES
from secagg.errors import SecAggError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = defaults
    parser.add_argument(
        "--institutions",
        type=int,
        default=None,
        help=f"number of institutions (default {d.INSTITUTIONS}; with --data: as the data has)",
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"(default {d.ROUNDS})")
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="turn on distributed DP with this epsilon over the whole run, against the server "
        "(client level, zero-out adjacency; every round an institution takes part in counts "
        "in full: no amplification by sampling is assumed)",
    )
    parser.add_argument("--dp-delta", type=float, default=None, help=f"(default {d.DP_DELTA:g})")
    parser.add_argument(
        "--dp-clip",
        type=float,
        default=None,
        help=f"L2 clip of a client's update under DP (default {d.DP_CLIP:g})",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="how the server sums the updates: pairwise masking (SecAgg/SecAgg+) or CKKS "
        "homomorphic encryption (weaker trust model, no DP) (default masking)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<timestamp>)"
    )
    parser.add_argument("--seed", type=int, default=None, help=f"(default {d.SEED})")
    parser.add_argument(
        "--model",
        default=None,
        help="the base: embedded (default), smollm2-135m (extra: fedsec[smollm2]) or a local "
        "transformers causal-LM directory",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a folder with one data file per institution (json/jsonl/parquet/csv; Alpaca, "
        "Dolly, ShareGPT, messages or prompt/completion records; optional test/ eval sets), "
        "or one file to split with --partition",
    )
    parser.add_argument(
        "--preference-data",
        type=Path,
        default=None,
        help="--stage dpo/sft+dpo: the institutions' preference pairs ({prompt, chosen, "
        "rejected} or chat message lists), a folder with one file per institution or one file "
        "to split with --partition (default: the embedded task's pairs; without --data the SFT "
        "stage trains on the chosen answers)",
    )
    parser.add_argument(
        "--partition",
        default=None,
        choices=SCHEMES,
        help="how to split one --data (or --preference-data) file",
    )
    parser.add_argument(
        "--partition-field", default=None, help="the record field of --partition field|dirichlet"
    )
    parser.add_argument(
        "--dirichlet-alpha", type=float, default=None, help="label skew of --partition dirichlet"
    )
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help=f"embedded data: training records per institution (default "
        f"{d.RECORDS_PER_INSTITUTION})",
    )
    parser.add_argument(
        "--eval-records",
        type=int,
        default=None,
        help=f"embedded data: held-out records per institution (default "
        f"{d.TEST_RECORDS_PER_INSTITUTION})",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help=f"embedded data, DPO stage: preference pairs per institution (default "
        f"{d.PAIRS_PER_INSTITUTION})",
    )
    parser.add_argument(
        "--eval-pairs",
        type=int,
        default=None,
        help=f"embedded data, DPO stage: held-out pairs per institution (default "
        f"{d.TEST_PAIRS_PER_INSTITUTION})",
    )
    parser.add_argument(
        "--generate",
        type=int,
        default=None,
        help=f"held-out questions per institution answered before and after training "
        f"(default {d.GENERATE_PER_INSTITUTION}; 0: no generation)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last finished round, with its own settings",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars to RUN_DIR/tensorboard (extra: fedsec[tensorboard])",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    recipes.add_arguments(parser)
    split_cli.add_arguments(parser)


#: Flags --resume accepts besides itself (the rest are the run's own settings).
_RESUME_FLAGS = {"resume", "quiet", "tensorboard"}


def _positive(value: float | None, flag: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a positive number, got {value}")


def spec_from_args(args: argparse.Namespace) -> tuple[SimulationSpec, tuple[str, ...]]:
    """The simulation the flags ask for, and notes on defaults chosen for it."""
    if args.institutions is not None and args.institutions < 3:
        raise UsageError(
            f"--institutions must be >= 3 for secure aggregation, got {args.institutions}"
        )
    for flag, value in (
        ("--rounds", args.rounds),
        ("--records", args.records),
        ("--pairs", args.pairs),
        ("--eval-pairs", args.eval_pairs),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--eval-records", args.eval_records), ("--generate", args.generate)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.eval_records == 0:
        raise UsageError("--eval-records must be >= 1: every institution needs a held-out set")
    _positive(args.dp_epsilon, "--dp-epsilon")
    _positive(args.dp_clip, "--dp-clip")
    if args.dp_delta is not None and not 0 < args.dp_delta < 1:
        raise UsageError(f"--dp-delta must be in (0, 1), got {args.dp_delta}")
    backend = args.backend or "masking"
    try:
        # Refused here, before the workload is built, rather than after minutes of set-up.
        check_backend(backend, dp_enabled=args.dp_epsilon is not None)
    except FederationConfigError as exc:
        raise UsageError(f"--backend {backend}: {exc}") from exc
    try:
        source = model_source(args.model)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data {args.data}: not a directory or file")
    if args.preference_data is not None and not args.preference_data.exists():
        raise UsageError(f"--preference-data {args.preference_data}: not a directory or file")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    split = None
    if args.partition is not None:
        _positive(args.dirichlet_alpha, "--dirichlet-alpha")
        try:
            split = PartitionSpec(
                args.partition,
                args.institutions,
                args.partition_field,
                args.dirichlet_alpha or 0.5,
                args.seed or defaults.SEED,
            )
        except PartitionError as exc:
            raise UsageError(f"--partition {args.partition}: {exc}") from exc
    elif args.partition_field is not None or args.dirichlet_alpha is not None:
        raise UsageError("--partition-field and --dirichlet-alpha go with --partition")
    rounds = args.rounds or defaults.ROUNDS
    try:
        resolved = recipes.resolve(source.base_kind, recipes.overrides_from_args(args))
        resolved.recipe.stage_rounds(rounds)
    except RecipeError as exc:
        raise UsageError(str(exc)) from exc
    recipe = resolved.recipe
    if recipe.has_dpo:
        if args.data is not None and args.preference_data is None:
            raise UsageError(
                f"--stage {recipe.stage} with --data needs the institutions' preference pairs: "
                "give --preference-data (the embedded task has its own)"
            )
    elif args.preference_data is not None or args.pairs is not None or args.eval_pairs:
        raise UsageError(
            "--preference-data, --pairs and --eval-pairs go with --stage dpo or sft+dpo"
        )
    dp = None
    if args.dp_epsilon is not None:
        dp = DpSettings(
            args.dp_epsilon, args.dp_delta or defaults.DP_DELTA, args.dp_clip or defaults.DP_CLIP
        )
    spec = SimulationSpec(
        institutions=args.institutions,
        rounds=rounds,
        recipe=recipe,
        dp=dp,
        seed=defaults.SEED if args.seed is None else args.seed,
        model=source.name,
        data=args.data,
        partition=split,
        backend=backend,
        records=args.records or defaults.RECORDS_PER_INSTITUTION,
        eval_records=args.eval_records or defaults.TEST_RECORDS_PER_INSTITUTION,
        generate=defaults.GENERATE_PER_INSTITUTION if args.generate is None else args.generate,
        preference_data=args.preference_data,
        pairs=args.pairs or defaults.PAIRS_PER_INSTITUTION,
        eval_pairs=args.eval_pairs or defaults.TEST_PAIRS_PER_INSTITUTION,
        split=split_cli.options_from_args(args, resolved.recipe),
    )
    return spec, resolved.notes


def _dp_summary(fed: Federation) -> str:
    """The DP line of the start banner: which epsilon, against whom, for how many rounds."""
    cal = fed.calibration
    if cal is None:
        return "off"
    return (
        f"eps={cal.epsilon:.4g} delta={cal.delta:g} against the server (zero-out, client level; "
        f"no amplification by sampling: each institution is in at most {cal.participations} "
        f"released sums, each counted in full)"
    )


def format_round(
    m: RoundMetrics,
    rounds: int,
    pooled: float | None = None,
    objective: str = "sft",
    preference: PreferenceScore | None = None,
) -> str:
    evals = "  ".join(f"{k} {v:.3f}" for k, v in m.eval_loss.items())
    upload = m.upload_bytes["per_client_mean"] / 1024
    pooled_text = "" if pooled is None else f"pooled {pooled:.3f}  "
    stage = "" if objective == "sft" and preference is None else f" [{objective}]"
    aligned = (
        ""
        if preference is None
        else f"  preference accuracy {preference.accuracy:.3f} margin {preference.margin:.3f}"
    )
    return (
        f"round {m.round + 1}/{rounds}{stage}  train {m.train_loss:.3f}  eval [{evals}]  "
        f"{pooled_text}mean {m.eval_loss_mean:.3f}{aligned}  agg {m.aggregation_s:.2f}s  "
        f"upload {upload:.1f} KiB/client  secure-vs-plain {m.secure_vs_plain_max_abs_diff:.2g} "
        f"(bound {m.quantization_bound:.2g})"
    )


def _describe(
    fed: Federation,
    trainer: TorchTrainer,
    spec: SimulationSpec,
    notes: Sequence[str],
    advice: NoiseGuidance | None,
    base: Mapping[str, Any],
) -> dict[str, object]:
    out = fed.describe()
    work = trainer.work
    recipe = spec.recipe
    out.update(
        lora_mode=recipe.lora_mode,
        lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        local_steps=recipe.local_steps,
        local_epochs=recipe.local_epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        recipe=recipe.to_dict(),
        runtime=work.lm.runtime.describe(),
        adapter=work.lm.describe(),
        model=work.model_source,
        base_model=dict(base),
        data=work.data_description,
        samples={n: len(d) for n, d in work.train_sets.items()},
        eval_sets={n: len(d) for n, d in work.test_sets.items()},
        stage=_stage_description(recipe, spec.rounds),
        preference_data=work.preference_description or None,
        pairs={n: len(d) for n, d in work.pair_train.items()},
        eval_pairs={n: len(d) for n, d in work.pair_test.items()},
        truncation=work.truncation(),
        notes=list(notes),
        dp_guidance=None if advice is None else {**advice.to_json(), "message": advice.message()},
        simulation=spec.to_json(),
        mode="lora" if spec.split is None else "split",
    )
    if isinstance(trainer, SplitRunTrainer) and trainer.core is not None and spec.split:
        model = trainer.core.client
        out["split"] = {
            **model.spec.describe(model.num_layers),
            "client_part": model.layout.client.size,
            "server_part": model.layout.server.size,
            "activation_noise": spec.split.noise,
            "server_lr": spec.split.server_lr or recipe.lr,
            "what_the_server_sees": WHAT_THE_SERVER_SEES,
        }
    return out


def _stage_description(recipe: Recipe, rounds: int) -> dict[str, Any]:
    sft, dpo = recipe.stage_rounds(rounds)
    out: dict[str, Any] = {"stage": recipe.stage, "sft_rounds": sft, "dpo_rounds": dpo}
    if dpo:
        out.update(
            dpo_start=sft,
            beta=recipe.dpo_beta,
            loss=recipe.dpo_loss,
            reference=recipe.dpo_reference,
            lr=recipe.dpo_lr if recipe.dpo_lr is not None else recipe.lr,
        )
    return out


def _generation_examples(work: Workload, count: int) -> dict[str, list[Example]]:
    return {n: list(d.examples[:count]) for n, d in work.test_sets.items() if count > 0}


def _answer(
    work: Workload,
    vector: np.ndarray,
    questions: Mapping[str, Sequence[Example]],
    use: ChatTemplateUse,
) -> dict[str, GenerationScore]:
    return {
        n: answer_questions(work.lm, vector, es, work.tokenizer, use) for n, es in questions.items()
    }


def _sample_rows(
    before: Mapping[str, Sequence[str]], after: Mapping[str, GenerationScore], per: int = 2
) -> list[dict[str, str]]:
    """A few questions per institution with the answers before and after training."""
    rows = []
    for name, score in after.items():
        for i, answer in enumerate(score.answers[:per]):
            earlier = before.get(name, [])
            rows.append(
                {
                    "institution": name,
                    "question": answer.question,
                    "reference": answer.reference,
                    "before": earlier[i] if i < len(earlier) else "",
                    "after": answer.answer,
                }
            )
    return rows


def _print_header(
    spec: SimulationSpec,
    fed: Federation,
    work: Workload,
    out: Path,
    initial: Mapping[str, float],
    notes: Sequence[str],
    advice: NoiseGuidance | None,
    start: int,
) -> None:
    dp = spec.dp
    adapted = work.lm.describe()
    modules = cast(dict[str, int], adapted["modules"])
    cut = work.truncation()
    lines = [
        f"fedsec simulate: {len(work.train_sets)} institutions, {spec.rounds} rounds, "
        f"{fed.backend.summary()}, DP {'off' if dp is None else _dp_summary(fed)}; "
        f"base {work.model_source}; initial eval pooled {work.pooled(initial):.3f}; "
        f"writing {out}",
        f"  LoRA on {sum(modules.values())} modules ({', '.join(modules)}), "
        f"{adapted['trainable_parameters']} trained parameters, "
        f"{work.lm.runtime.describe()['device']} {work.lm.runtime.precision}",
        f"  recipe: lr {spec.recipe.lr:g} ({spec.recipe.lr_schedule}), batch "
        f"{spec.recipe.batch_size}, "
        + (
            f"{spec.recipe.local_steps} local steps"
            if spec.recipe.local_steps
            else f"{spec.recipe.local_epochs} local epochs"
        )
        + f", strategy {spec.recipe.strategy} {spec.recipe.params() or ''}".rstrip(),
        f"  truncation at {cut['max_length']} tokens: {cut['train_truncated']} of "
        f"{cut['train_examples']} training examples cut ({cut['train_dropped']} dropped)",
    ]
    sft_rounds, dpo_rounds = spec.recipe.stage_rounds(spec.rounds)
    if dpo_rounds:
        recipe = spec.recipe
        pairs = work.pair_truncation()
        lines.append(
            f"  stage {recipe.stage}: {sft_rounds} SFT then {dpo_rounds} DPO rounds"
            if sft_rounds
            else f"  stage dpo: {dpo_rounds} DPO rounds"
        )
        lines[-1] += (
            f" ({recipe.dpo_loss}, beta {recipe.dpo_beta:g}, lr "
            f"{recipe.dpo_lr if recipe.dpo_lr is not None else recipe.lr:g}, reference: "
            + (
                "the adapter each round starts from"
                if recipe.dpo_reference == "round"
                else "the adapter the stage starts from"
            )
            + f"); {pairs['train_pairs']} training pairs, {pairs['eval_pairs']} held out"
        )
    if spec.split is not None:
        where = spec.split.spec
        lines.append(
            f"  split learning: institutions keep the embedding, {where.client_bottom} bottom and "
            f"{where.client_top} top block(s) and the head; the server trains the blocks between "
            f"and sees their activations (noise ratio {spec.split.noise:g}); only the "
            f"institutions' part ({fed.dim} coordinates) is securely aggregated"
        )
    lines += [f"  {note}" for note in notes]
    if advice is not None:
        lines.append(f"  {advice.message()}")
    if start:
        lines.append(f"  resuming after round {start} of {spec.rounds}")
    print("\n".join(lines), flush=True)


def _base_reference(out: Path, source: ModelSource) -> dict[str, Any]:
    """How the run's adapters find their base (``base_model_name_or_path`` and run.json)."""
    if source.kind == "embedded":
        return {"kind": "embedded", "path": str((out / BASE_DIR).resolve())}
    if source.kind == "named":
        return {"kind": "named", "name": source.name, "gguf": source.reference()}
    return {"kind": "directory", "path": source.reference()}


class _Scalars:
    """TensorBoard scalars per round (``--tensorboard``), or nothing."""

    def __init__(self, directory: Path | None) -> None:
        self.writer: Any = None
        if directory is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError(
                "--tensorboard needs the tensorboard package: pip install 'fedsec[tensorboard]'"
            ) from exc
        self.writer = SummaryWriter(str(directory))

    def add(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _record_initial(
    writer: RunWriter,
    trainer: TorchTrainer,
    vector: np.ndarray,
    questions: Mapping[str, Sequence[Example]],
    use: ChatTemplateUse,
) -> dict[str, float]:
    """Score the untrained adapter (losses and answers) into ``initial.json``."""
    work = trainer.work
    initial = trainer.evaluate(vector)
    before = _answer(work, trainer.full_vector(vector), questions, use)
    record: dict[str, Any] = {
        "eval_loss": initial,
        "eval_loss_pooled": work.pooled(initial),
        "generation": {n: s.to_json() for n, s in before.items()},
        "answers": {n: [a.answer for a in s.answers] for n, s in before.items()},
    }
    if trainer.objective(0) == "dpo":
        # Stage dpo: the untrained adapter is the DPO reference (scores at chance by definition;
        # the policy-alone ranking is the informative baseline).
        trainer.begin_dpo(vector)
        record["preference"] = {
            n: s.to_json() for n, s in trainer.preference_scores(vector).items()
        }
    writer.write_json(INITIAL_FILE, record)
    return initial


def _generation_summary(
    writer: RunWriter,
    work: Workload,
    vector: np.ndarray,
    questions: Mapping[str, Sequence[Example]],
    use: ChatTemplateUse,
) -> dict[str, Any] | None:
    """The trained adapter's answers beside the untrained one's (from ``initial.json``)."""
    if not questions:
        return None
    saved = writer.read_json(INITIAL_FILE)
    after = _answer(work, vector, questions, use)
    return {
        "before": saved.get("generation", {}),
        "after": {n: s.to_json() for n, s in after.items()},
        "samples": _sample_rows(saved.get("answers", {}), after),
        "answers": {
            n: [
                {"question": a.question, "reference": a.reference, "answer": a.answer}
                for a in s.answers
            ]
            for n, s in after.items()
        },
    }


def _check_resume_flags(args: argparse.Namespace, parser_defaults: Mapping[str, Any]) -> None:
    given = sorted(
        k for k, v in vars(args).items() if k not in _RESUME_FLAGS and v != parser_defaults.get(k)
    )
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"--resume continues a run with its own settings; drop {flags}")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    notes: tuple[str, ...] = ()
    if args.resume is not None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        _check_resume_flags(args, vars(parser.parse_args([])))
        try:
            writer = RunWriter.reopen(args.resume)
            spec = SimulationSpec.from_json(writer.config["simulation"])
            state = load_state(args.resume)
        except (RunDirectoryError, KeyError, TypeError, ValueError, RecipeError) as exc:
            raise UsageError(f"--resume {args.resume}: {exc}") from exc
        out: Path = args.resume
        notes = tuple(writer.config.get("notes", ()))
    else:
        spec, notes = spec_from_args(args)
        out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        state = None
    try:
        fed, trainer = prepare(spec)
        work = trainer.work
        source = model_source(spec.model)
        base = _base_reference(out, source)
        advice = dp_advice(fed)
        if state is None:
            writer = RunWriter(out, _describe(fed, trainer, spec, notes, advice, base))
            if work.embedded_base is not None:
                save_base(work.embedded_base, work.tokenizer, out / BASE_DIR)
        adapter_config = work.lm.adapter_config(base.get("path") or base.get("gguf"))
        use = spec.recipe.chat_template
        questions = _generation_examples(work, spec.generate)
        if state is None:
            initial = _record_initial(writer, trainer, fed.global_vector, questions, use)
            start = 0
        else:
            initial = {k: float(v) for k, v in writer.read_json(INITIAL_FILE)["eval_loss"].items()}
            fed.global_vector = state.global_vector.astype(np.float32)
            if state.strategy:
                fed.strategy.load_state_dict(state.strategy)
            trainer.restore(state.clients, state.shared)
            trainer.restore_server_part(state.server)
            start = state.next_round
        _print_header(spec, fed, work, out, initial, notes, advice, start)
        scalars = _Scalars(out / "tensorboard" if args.tensorboard else None)
        bar = tqdm(total=spec.rounds, initial=start, desc="rounds", unit="round",
                   disable=args.quiet)  # fmt: skip

        dpo_start = spec.recipe.dpo_start(spec.rounds)

        def on_round(outcome: RoundOutcome) -> None:
            m = outcome.metrics
            pooled = work.pooled(m.eval_loss)
            objective = trainer.objective(m.round)
            extra: dict[str, Any] = {
                "eval_loss_pooled": pooled,
                "lr": trainer.round_lr(m.round),
                "objective": objective,
            }
            scores: dict[str, PreferenceScore] = {}
            if dpo_start is not None and m.round + 1 == dpo_start:
                # The SFT stage's last adapter is where the DPO stage starts (its reference).
                trainer.begin_dpo(outcome.global_vector)
            if dpo_start is not None and m.round + 1 >= dpo_start:
                scores = trainer.preference_scores(outcome.global_vector)
                extra["preference"] = {n: s.to_json() for n, s in scores.items()}
            writer.record_round(
                outcome,
                trainer.adapter_tensors(outcome.global_vector),
                adapter_config,
                extra,
            )
            save_state(
                out,
                RunState(
                    m.round + 1,
                    outcome.global_vector,
                    fed.strategy.state_dict(),
                    trainer.client_state(),
                    trainer.shared_state(),
                    trainer.server_part(),
                ),
            )
            scalars.add(
                m.round + 1,
                {
                    "train_loss": m.train_loss,
                    "eval_loss/pooled": pooled,
                    "eval_loss/mean": m.eval_loss_mean,
                    **{f"eval_loss/{k}": v for k, v in m.eval_loss.items()},
                    **{f"preference_accuracy/{k}": s.accuracy for k, s in scores.items()},
                    **{f"reward_margin/{k}": s.margin for k, s in scores.items()},
                    "aggregation_s": m.aggregation_s,
                },
            )
            line = format_round(m, spec.rounds, pooled, objective, scores.get(POOLED))
            tqdm.write(line, file=sys.stdout)
            bar.update(1)

        with bar:
            fed.run(on_round, start=start)
        scalars.close()
        full = trainer.full_vector(fed.global_vector)
        generation = _generation_summary(writer, work, full, questions, use)
        saved = writer.read_json(INITIAL_FILE)
        writer.finish(
            initial,
            time.perf_counter() - started,
            generation,
            float(saved["eval_loss_pooled"]),
            saved.get("preference"),
        )
    except (DataFormatError, EmptyDatasetError, ModelLoadError, ChatTemplateError) as exc:
        raise UsageError(str(exc)) from exc
    except (DeviceError, LoraTargetError, PartitionError, TrainingConfigError) as exc:
        raise UsageError(str(exc)) from exc
    except (DpoConfigError, WorkloadError) as exc:
        raise UsageError(str(exc)) from exc
    except (FLError, SecAggError) as exc:
        raise UsageError(f"{type(exc).__name__}: {exc}") from exc
    print(f"done in {time.perf_counter() - started:.1f} s: {out / 'report.md'}", flush=True)
    return 0

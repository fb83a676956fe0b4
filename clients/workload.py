"""What a simulation is made of (:class:`SimulationSpec`) and what it builds from it before
anything trains (:func:`build_workload`): the institutions' data (the embedded synthetic task, or
their own files), the base model with its LoRA adapter, and every held-out set.

``fedsec simulate`` (:mod:`clients.simulate_cli`) parses its flags into a spec; the benchmarks and
the Flower example build the same spec directly, so they run ``fedsec simulate``'s own workload.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from clients.errors import (
    WorkloadError,
)
from clients.local_data import InstitutionData, load_data
from clients.model_factory import (
    build_default_base,
    load_source,
    model_source,
)
from clients.partition import PartitionSpec
from clients.preference_data import (
    PreferencePair,
    TokenizedPairs,
    load_preference_data,
    tokenize_pairs,
)
from clients.split.trainer import SplitOptions
from clients.synthetic import make_federation, make_preferences
from clients.trainer import (
    LoraModel,
    LoraSettings,
)
from fl_core import recipe as recipes
from fl_core.federation import (
    DpSettings,
)
from fl_core.recipe import Recipe


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
            "split": None if self.split is None else self.split.to_json(),
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
            split=SplitOptions.from_json(data.get("split")),
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
        raise WorkloadError(
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
            raise WorkloadError("--preference-data goes with --stage dpo or sft+dpo")
        pairs = load_preference_data(spec.preference_data, spec.partition)
        _check_institutions(spec, len(pairs.train), "--preference-data", spec.preference_data)
    elif recipe.has_dpo and spec.data is not None:
        raise WorkloadError(
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
        raise WorkloadError(
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

"""Every attack on every view: the table a privacy officer reads.

The scenario is a federation in which client 0 is the victim. Each client holds ``batch``
training texts of ``length`` tokens and produces two kinds of update from the same global model:

* a FedSGD update (one gradient step on all weights, embedding and LM head included), which the
  token-set, span and optimisation attacks read;
* a LoRA update (``lora_steps`` local SGD steps on its batch, rank ``lora_rank``, the trainer's
  default target modules, LoRA dropout off), starting from a global adapter whose B matrices
  are non-zero as in any round after the first; the LoRA token-set attack reads the LM head's
  LoRA B, the LoRA span attack reads block 0's LoRA A matrices.

The optimisation attack searches among the tokens the token-set attack names on the same view
(the whole vocabulary when it names none) and runs for batches up to
``optimisation_max_batch`` only, because its cost grows with steps × batch.

Clients train on the whole text (prompt and response). Each row scores one attack on one view
against the victim's batch; ``union_recall`` (aggregate views only) scores it against the union
of all clients' tokens, which is what a sum can still reveal without saying who wrote what.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from clients.data import AlpacaRecord, TokenizedDataset, alpaca_prompt
from clients.model_factory import build_default_base
from clients.synthetic import make_federation
from clients.trainer import LoraModel, LoraSettings, TrainSettings, train_local
from proofs.attacks.errors import AttackInputError
from proofs.attacks.metrics import batch_rouge_l, chance_recall, token_scores
from proofs.attacks.model_access import Update, to_update
from proofs.attacks.optimisation import optimisation_attack
from proofs.attacks.result import Reconstruction
from proofs.attacks.span import span_attack
from proofs.attacks.token_leakage import token_leakage_attack
from proofs.attacks.views import (
    VIEWS,
    aggregate_dp_view,
    aggregate_view,
    flatten,
    masked_view,
    plaintext_view,
)

ATTACKS = ("token_leakage", "token_leakage_lora", "span", "span_lora", "optimisation")
_LORA_ATTACKS = frozenset({"token_leakage_lora", "span_lora"})


@dataclass(frozen=True)
class MatrixConfig:
    batches: tuple[int, ...] = (1, 4, 16)
    clients: tuple[int, ...] = (2, 10)
    attacks: tuple[str, ...] = ATTACKS
    views: tuple[str, ...] = VIEWS
    length: int = 32
    epsilon: float = 8.0
    delta: float = 1e-5
    ring_bits: int = 32
    fedsgd_lr: float = 0.01
    lora_rank: int = 16
    lora_steps: int = 3
    lora_lr: float = 0.05
    optimisation_steps: int = 300
    optimisation_lr: float = 0.5
    #: The optimisation attack costs steps × batch forward-and-double-backward passes; larger
    #: batches are left out of the matrix (no row) rather than run with too few steps.
    optimisation_max_batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.attacks) - set(ATTACKS)) + sorted(set(self.views) - set(VIEWS))
        if unknown:
            raise AttackInputError(
                f"unknown attack or view {unknown}; attacks: {ATTACKS}, views: {VIEWS}"
            )
        if not self.batches or min(self.batches) < 1:
            raise AttackInputError("batch sizes must be at least 1")
        if not self.clients or min(self.clients) < 2:
            raise AttackInputError("secure aggregation needs at least 2 clients per setting")
        if self.length < 2:
            raise AttackInputError(f"texts need at least 2 tokens, got length={self.length}")
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise AttackInputError(f"need epsilon > 0 and 0 < delta < 1, got {self.epsilon}")


@dataclass(frozen=True)
class MatrixRow:
    attack: str
    view: str
    batch: int
    clients: int
    token_precision: float
    token_recall: float
    rouge_l: float
    chance_recall: float
    union_recall: float | None
    recovered: int
    seconds: float
    detail: str


@dataclass(frozen=True)
class Scenario:
    """The public model, the clients' private texts and a public prior for chance guessing.

    ``texts[c]`` are client c's token sequences (at least ``max(batches)`` of them, each at
    least ``length`` tokens); ``prior_counts`` counts tokens in public text of the same domain
    that is not any client's (e.g. a held-out set).
    """

    model: nn.Module
    texts: Sequence[Sequence[Sequence[int]]]
    prior_counts: Counter[int]

    @property
    def vocab_size(self) -> int:
        weight = self.model.get_input_embeddings().weight  # type: ignore[operator]
        return int(weight.shape[0])


@dataclass
class _ClientUpdates:
    ids: torch.Tensor
    fedsgd: Update
    lora: Update


def run_matrix(
    scenario: Scenario,
    config: MatrixConfig,
    progress: Callable[[MatrixRow], None] | None = None,
) -> list[MatrixRow]:
    """All rows of the matrix (attack × view × batch × clients), victim = client 0."""
    n_max = max(config.clients)
    if len(scenario.texts) < n_max:
        raise AttackInputError(f"{n_max} clients asked for, the scenario has {len(scenario.texts)}")
    model = scenario.model
    model.eval()
    lora_model: LoraModel | None = None
    lora_global: np.ndarray | None = None
    if any(a in _LORA_ATTACKS for a in config.attacks):
        lora_model, lora_global = global_adapter(model, config.lora_rank, config.seed)
    rows: list[MatrixRow] = []
    for batch in config.batches:
        updates = [
            _client_updates(scenario, c, batch, config, lora_model, lora_global)
            for c in range(n_max)
        ]
        for n in config.clients:
            cohort = updates[:n]
            truth = set(cohort[0].ids.flatten().tolist())
            union = set(torch.cat([u.ids.flatten() for u in cohort]).tolist())
            for kind in ("fedsgd", "lora"):
                attacks = [
                    a
                    for a in config.attacks
                    if (a in _LORA_ATTACKS) == (kind == "lora")
                    and not (a == "optimisation" and batch > config.optimisation_max_batch)
                ]
                if not attacks:
                    continue
                per_client = [u.fedsgd if kind == "fedsgd" else u.lora for u in cohort]
                for view in config.views:
                    observed = _view(view, per_client, config)
                    for attack in attacks:
                        start = time.perf_counter()
                        result = _attack(attack, observed, scenario, lora_model, batch, config)
                        seconds = time.perf_counter() - start
                        row = _score(
                            attack, view, batch, n, result, cohort[0].ids, truth, union, scenario
                        )
                        row = MatrixRow(**{**asdict(row), "seconds": round(seconds, 3)})
                        rows.append(row)
                        if progress is not None:
                            progress(row)
    return rows


def global_adapter(model: nn.Module, rank: int, seed: int) -> tuple[LoraModel, np.ndarray]:
    """The LoRA model every client starts from: a copy of the base plus an adapter whose B is
    non-zero (at B = 0, as in round one, A receives no gradient at all)."""
    lm = LoraModel(copy.deepcopy(model), LoraSettings(rank=rank))  # type: ignore[arg-type]
    vector = lm.get_vector().copy()
    rng = np.random.default_rng(seed)  # a public model state, nothing secret
    offset = 0
    for name, shape in lm.layout.entries:
        size = int(np.prod(shape))
        if ".lora_B." in name:
            vector[offset : offset + size] = rng.normal(0.0, 0.02, size)
        offset += size
    lm.set_vector(vector)
    lm.model.eval()
    return lm, vector


def _client_updates(
    scenario: Scenario,
    client: int,
    batch: int,
    config: MatrixConfig,
    lora_model: LoraModel | None,
    lora_global: np.ndarray | None,
) -> _ClientUpdates:
    texts = [t for t in scenario.texts[client] if len(t) >= config.length][:batch]
    if len(texts) < batch:
        raise AttackInputError(
            f"client {client} has {len(texts)} texts of at least {config.length} tokens, "
            f"{batch} needed"
        )
    ids = torch.tensor([list(t[: config.length]) for t in texts], dtype=torch.long)
    model = scenario.model
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    fedsgd = to_update(
        {n: -config.fedsgd_lr * p.grad for n, p in model.named_parameters() if p.grad is not None}
    )
    model.zero_grad(set_to_none=True)
    lora: Update = {}
    if lora_model is not None and lora_global is not None:
        data = TokenizedDataset(
            tuple(r.numpy() for r in ids), tuple(r.numpy().copy() for r in ids), 0
        )
        settings = TrainSettings(
            local_steps=config.lora_steps,
            batch_size=batch,
            lr=config.lora_lr,
            optimizer="sgd",
            seed=config.seed + client,
            num_threads=None,
        )
        result = train_local(lora_model, lora_global, data, settings, pad_id=0)
        lora = {
            n: v.astype(np.float64) for n, v in lora_model.layout.unflatten(result.delta).items()
        }
        lora_model.set_vector(lora_global)  # the attacker's model is the global one
        lora_model.model.eval()
    return _ClientUpdates(ids, fedsgd, lora)


def _view(view: str, per_client: Sequence[Update], config: MatrixConfig) -> Update:
    victim = per_client[0]
    if view == "plaintext":
        return plaintext_view(victim)
    # The public clip: no client's update is clipped (the attacker's most favourable case).
    clip = max(float(np.linalg.norm(flatten(u)[0])) for u in per_client)
    if view == "masked":
        coordinate_clip = max(float(np.abs(flatten(u)[0]).max()) for u in per_client)
        return masked_view(victim, len(per_client), coordinate_clip, config.ring_bits)
    if view == "aggregate":
        return aggregate_view(per_client)
    return aggregate_dp_view(per_client, config.epsilon, config.delta, clip, "skellam")


def _attack(
    attack: str,
    update: Update,
    scenario: Scenario,
    lora_model: LoraModel | None,
    batch: int,
    config: MatrixConfig,
) -> Reconstruction:
    if attack in ("token_leakage", "token_leakage_lora"):
        return token_leakage_attack(update, scenario.vocab_size)
    if attack == "span":
        return span_attack(update, scenario.model, lora=False, max_length=2 * config.length)
    if attack == "span_lora":
        if lora_model is None:
            raise AttackInputError("the LoRA span attack needs the global LoRA model")
        return span_attack(update, lora_model.model, lora=True, max_length=2 * config.length)
    # The search is restricted to the tokens the token-set attack names on the same view (the
    # whole vocabulary when it names none, as on masked or DP views).
    candidates = token_leakage_attack(update, scenario.vocab_size).tokens
    return optimisation_attack(
        update,
        scenario.model,
        batch=batch,
        length=config.length,
        steps=config.optimisation_steps,
        learning_rate=config.optimisation_lr,
        candidates=candidates,
        seed=config.seed,
    )


def _score(
    attack: str,
    view: str,
    batch: int,
    clients: int,
    result: Reconstruction,
    ids: torch.Tensor,
    truth: set[int],
    union: set[int],
    scenario: Scenario,
) -> MatrixRow:
    scores = token_scores(result.tokens, truth)
    chance = chance_recall(len(result.tokens), truth, scenario.vocab_size, scenario.prior_counts)
    union_recall = None
    if view.startswith("aggregate"):
        union_recall = round(token_scores(result.tokens, union).recall, 4)
    return MatrixRow(
        attack=attack,
        view=view,
        batch=batch,
        clients=clients,
        token_precision=round(scores.precision, 4),
        token_recall=round(scores.recall, 4),
        rouge_l=round(batch_rouge_l(result.sequences, ids.tolist()), 4),
        chance_recall=round(chance, 4),
        union_recall=union_recall,
        recovered=len(result.tokens),
        seconds=0.0,
        detail=result.detail,
    )


def markdown_table(rows: Sequence[MatrixRow]) -> str:
    """The matrix as a markdown table, one line per row."""
    head = (
        "| attack | view | batch | clients | precision | recall | chance recall | ROUGE-L "
        "| union recall | named |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        union = "–" if r.union_recall is None else f"{r.union_recall:.2f}"
        lines.append(
            f"| {r.attack} | {r.view} | {r.batch} | {r.clients} | {r.token_precision:.2f} "
            f"| {r.token_recall:.2f} | {r.chance_recall:.2f} | {r.rouge_l:.2f} | {union} "
            f"| {r.recovered} |"
        )
    return "\n".join(lines)


def default_scenario(n_clients: int, seed: int = 0) -> Scenario:
    """The embedded default: the synthetic non-IID federation and the tiny Llama built for it.

    Client c is institution c; the chance prior counts the tokens of the federation's held-out
    test sets (same domains, nobody's training text).
    """
    federation = make_federation(num_institutions=n_clients, seed=seed)
    model, tokenizer = build_default_base(federation.corpus())

    def encode(records: Sequence[AlpacaRecord]) -> list[list[int]]:
        return [tokenizer.encode(alpaca_prompt(r.instruction, r.input) + r.output) for r in records]

    texts = [encode(institution.records) for institution in federation.institutions]
    prior: Counter[int] = Counter()
    for records in federation.test_sets.values():
        for ids in encode(records):
            prior.update(ids)
    return Scenario(model, texts, prior)

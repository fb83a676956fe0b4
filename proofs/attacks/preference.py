"""What a DPO update reveals of an institution's preference pairs, view by view.

The victim (client 0) runs ``lora_steps`` local DPO steps (:func:`clients.dpo.train_dpo`, plain
SGD, the reference the round's start, as at the first round of a DPO stage) on a batch of its
preference pairs, from a global adapter whose B matrices are non-zero (as in any round after the
first); the other clients do the same on theirs. Two attacks read each view the server could
hold (:mod:`proofs.attacks.views`):

* ``token_leakage``: the generic token-set attack
  (:func:`proofs.attacks.token_leakage.token_leakage_attack`), unchanged from SFT updates;
* ``preference``: :func:`preference_attack`, which knows the round was DPO (every round's
  ``TrainTask`` names its objective) and also says on which side of the pair a token was.

What they name is sorted by where the token occurs in the victim's pairs:

* ``chosen_only``: tokens of the chosen answers that neither the rejected answers nor the prompts
  contain: the institution's *preferred* wording;
* ``rejected_only``: tokens only in the rejected answers: what it rules out;
* ``both_answers``: answer tokens on both sides (not in the prompts);
* ``prompt_only``: tokens only in the prompts.

Why: the DPO gradient is k * grad(log pi(chosen) - log pi(rejected)), k > 0 per pair. Prompt
tokens are never labels, and where the two answers share a beginning each shared position has
the same context on both sides, so its terms cancel exactly. After the answers diverge, a chosen
position moves the LM head's rows like an SFT label would (its label row by +(1 - p) h, every
other row by -p h, h the head's input) and a rejected position does the opposite. The
generic attack's bulk direction (the median row) is then the difference of two opposite pulls,
whose sign depends on the batch, so it names whichever side happens to dominate. The preference
attack instead projects each row on the direction of the head's inputs, which the server
computes from the global model on public text (hidden states share a common direction): a row
well above the bulk was a chosen label, one well below a rejected label. A masked vector is
uniform noise and names nothing; so does the DP sum at the default epsilon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from clients import defaults
from clients.data import IGNORE_INDEX, alpaca_prompt
from clients.dpo import DpoSettings, train_dpo
from clients.model_factory import build_default_base
from clients.preference_data import PreferencePair, TokenizedPairs, tokenize_pairs
from clients.synthetic import make_federation, make_preferences
from clients.trainer import LoraModel, TrainSettings
from proofs.attacks.errors import AttackInputError
from proofs.attacks.matrix import global_adapter
from proofs.attacks.model_access import Array, Update
from proofs.attacks.token_leakage import (
    HEAD_SUFFIXES,
    Z_THRESHOLD,
    outlier_rows,
    token_leakage_attack,
    vocabulary_rows,
)
from proofs.attacks.views import (
    VIEWS,
    aggregate_dp_view,
    aggregate_view,
    flatten,
    masked_view,
    plaintext_view,
)

CATEGORIES = ("chosen_only", "rejected_only", "both_answers", "prompt_only")
PREFERENCE_ATTACKS = ("token_leakage", "preference")


@dataclass(frozen=True)
class PreferenceConfig:
    """The attack grid on DPO updates. ``lora_lr`` is larger than the SFT matrix's because a
    DPO gradient is beta * sigmoid(-margin) (0.05 at the start) times an SFT-like one."""

    batches: tuple[int, ...] = (1, 4, 16)
    clients: tuple[int, ...] = (2, 10)
    attacks: tuple[str, ...] = PREFERENCE_ATTACKS
    views: tuple[str, ...] = VIEWS
    epsilon: float = 8.0
    delta: float = 1e-5
    ring_bits: int = 32
    lora_rank: int = 16
    lora_steps: int = 3
    lora_lr: float = 0.5
    beta: float = 0.1
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.attacks) - set(PREFERENCE_ATTACKS)) + sorted(
            set(self.views) - set(VIEWS)
        )
        if unknown:
            raise AttackInputError(
                f"unknown attack or view {unknown}; attacks on a DPO update: "
                f"{PREFERENCE_ATTACKS}, views: {VIEWS}"
            )
        if not self.batches or min(self.batches) < 1:
            raise AttackInputError("batch sizes must be at least 1")
        if not self.clients or min(self.clients) < 2:
            raise AttackInputError("secure aggregation needs at least 2 clients per setting")
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise AttackInputError(f"need epsilon > 0 and 0 < delta < 1, got {self.epsilon}")


@dataclass(frozen=True)
class PreferenceRow:
    """One attack on one view of the victim's DPO update.

    ``recall[c]``: the share of the victim's tokens of category ``c`` the attack named;
    ``precision``: the share of named tokens that occur anywhere in the victim's pairs;
    ``named_by_category``: how many named tokens fall in each category (the rest,
    ``named_elsewhere``, in none). The preference attack also puts each token on a side:
    ``right_side`` is the share of the named chosen-only and rejected-only tokens it put on
    their own side (None for the token-set attack, which names no side, or when it named none
    of them)."""

    attack: str
    view: str
    batch: int
    clients: int
    named: int
    precision: float
    recall: dict[str, float]
    named_by_category: dict[str, int]
    named_elsewhere: int
    category_sizes: dict[str, int]
    right_side: float | None
    seconds: float


@dataclass(frozen=True)
class PreferenceReconstruction:
    """The tokens the preference attack names, by the side of the pair it puts them on."""

    chosen: frozenset[int]
    rejected: frozenset[int]

    @property
    def tokens(self) -> frozenset[int]:
        return self.chosen | self.rejected


@dataclass(frozen=True)
class PreferenceScenario:
    """The public model, each client's private preference pairs, and public text of the same
    domain that is no client's (the attacker's, for the direction of the head's inputs)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    pairs: Sequence[Sequence[PreferencePair]]
    public_texts: Sequence[Sequence[int]]

    @property
    def vocab_size(self) -> int:
        weight = self.model.get_input_embeddings().weight  # type: ignore[operator]
        return int(weight.shape[0])


def default_preference_scenario(
    n_clients: int,
    seed: int = 0,
    pairs_per_client: int = 16,
    test_pairs_per_client: int = defaults.TEST_PAIRS_PER_INSTITUTION,
    records_per_client: int = defaults.RECORDS_PER_INSTITUTION,
    test_records_per_client: int = defaults.TEST_RECORDS_PER_INSTITUTION,
) -> PreferenceScenario:
    """The embedded model and each institution's embedded preference pairs, built as
    ``fedsec simulate`` builds them (so a run's seed and counts give the run's own base model and
    pairs); the public text is the federation's held-out SFT records of each domain (as in
    :func:`proofs.attacks.matrix.default_scenario`)."""
    federation = make_federation(
        n_clients,
        records_per_client,
        defaults.TEST_RECORDS_PER_DOMAIN,
        defaults.OWN_DOMAIN_SHARE,
        seed,
        test_records_per_institution=test_records_per_client,
    )
    model, tokenizer = build_default_base(federation.corpus(), defaults.MODEL)
    task = make_preferences(
        n_clients, pairs_per_client, test_pairs_per_client, defaults.OWN_DOMAIN_SHARE, seed
    )
    public = [
        tokenizer.encode(alpaca_prompt(r.instruction, r.input) + r.output)
        for records in federation.test_sets.values()
        for r in records
    ]
    return PreferenceScenario(model, tokenizer, [task.train[n] for n in task.train], public)


def token_categories(pairs: TokenizedPairs) -> dict[str, set[int]]:
    """The victim's distinct tokens by where they occur (see the module doc)."""
    chosen: set[int] = set()
    rejected: set[int] = set()
    prompt: set[int] = set()
    for side, into in ((pairs.chosen, chosen), (pairs.rejected, rejected)):
        for ids, labels in zip(side.input_ids, side.labels, strict=True):
            answer = labels != IGNORE_INDEX
            into.update(int(t) for t in ids[answer])
            prompt.update(int(t) for t in ids[~answer])
    return {
        "chosen_only": chosen - rejected - prompt,
        "rejected_only": rejected - chosen - prompt,
        "both_answers": (chosen & rejected) - prompt,
        "prompt_only": prompt - chosen - rejected,
    }


def _head_lora_a(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """The LM head's LoRA layer and its A matrix (rank x hidden)."""
    for name, module in model.named_modules():
        adapters = getattr(module, "lora_A", None)
        if name.endswith("lm_head") and isinstance(adapters, nn.ModuleDict) and adapters:
            first = next(iter(adapters.values()))
            if isinstance(first, nn.Linear):
                return module, first.weight.detach().float()
    raise AttackInputError(
        "the model's LM head carries no LoRA adapter; the preference attack reads its LoRA B"
    )


@torch.no_grad()
def head_direction(model: nn.Module, texts: Sequence[Sequence[int]]) -> Array:
    """The mean input of the LM head's LoRA B (its LoRA A times the head's input h) over the
    positions of ``texts``, under the global model: what the attacker knows of the direction a
    label row moves in. Every text is run alone (no padding)."""
    if not texts:
        raise AttackInputError("the preference attack needs some public text for its direction")
    head, lora_a = _head_lora_a(model)
    inputs: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].reshape(-1, args[0].shape[-1]).float())

    was_training = model.training
    model.eval()
    handle = head.register_forward_pre_hook(grab)
    try:
        for ids in texts:
            model(input_ids=torch.tensor([list(ids)], dtype=torch.long))
    finally:
        handle.remove()
        model.train(was_training)
    projected = torch.cat(inputs) @ lora_a.T
    direction: Array = projected.mean(dim=0).double().cpu().numpy()
    return direction


def preference_attack(
    update: Update, direction: Array, vocab_size: int, z_threshold: float = Z_THRESHOLD
) -> PreferenceReconstruction:
    """Name the label tokens of the victim's pairs, each on its side (see the module doc): rows
    of the head's LoRA B whose projection on ``direction`` is a robust outlier above the bulk
    were chosen labels, below it rejected labels."""
    head = vocabulary_rows(update, vocab_size, tuple(s for s in HEAD_SUFFIXES if "lora_B" in s))
    if head is None:
        raise AttackInputError(
            "the update has no LoRA B of the LM head (names ending in lm_head.lora_B.weight); "
            "the preference attack needs the head adapted"
        )
    if head.shape[1] != direction.shape[0]:
        raise AttackInputError(
            f"the direction has {direction.shape[0]} coordinates, the head's LoRA B rows "
            f"{head.shape[1]}"
        )
    scores = head @ direction
    return PreferenceReconstruction(
        chosen=frozenset(int(t) for t in outlier_rows(scores, z_threshold)),
        rejected=frozenset(int(t) for t in outlier_rows(-scores, z_threshold)),
    )


def dpo_update(
    lm: LoraModel,
    start: np.ndarray,
    pairs: TokenizedPairs,
    config: PreferenceConfig,
    seed: int,
    pad_id: int,
) -> Update:
    """One client's DPO update on ``pairs`` (all of them as one batch), by tensor name."""
    settings = TrainSettings(
        local_steps=config.lora_steps,
        batch_size=len(pairs),
        lr=config.lora_lr,
        optimizer="sgd",
        seed=seed,
        num_threads=None,
    )
    result = train_dpo(lm, start, pairs, settings, DpoSettings(config.beta), pad_id)
    return {n: v.astype(np.float64) for n, v in lm.layout.unflatten(result.delta).items()}


def _view(view: str, per_client: Sequence[Update], config: PreferenceConfig) -> Update:
    victim = per_client[0]
    if view == "plaintext":
        return plaintext_view(victim)
    if view == "masked":
        coordinate_clip = max(float(np.abs(flatten(u)[0]).max()) for u in per_client)
        return masked_view(victim, len(per_client), coordinate_clip, config.ring_bits)
    if view == "aggregate":
        return aggregate_view(per_client)
    # The public clip: no client's update is clipped (the attacker's most favourable case).
    clip = max(float(np.linalg.norm(flatten(u)[0])) for u in per_client)
    return aggregate_dp_view(per_client, config.epsilon, config.delta, clip, "skellam")


def _row(
    attack: str,
    view: str,
    batch: int,
    clients: int,
    named: frozenset[int],
    sides: PreferenceReconstruction | None,
    categories: dict[str, set[int]],
    seconds: float,
) -> PreferenceRow:
    everything = set().union(*categories.values())
    right_side = None
    if sides is not None:
        sided = named & (categories["chosen_only"] | categories["rejected_only"])
        right = (sides.chosen & categories["chosen_only"]) | (
            sides.rejected & categories["rejected_only"]
        )
        right_side = round(len(right) / len(sided), 4) if sided else None
    return PreferenceRow(
        attack=attack,
        view=view,
        batch=batch,
        clients=clients,
        named=len(named),
        precision=round(len(named & everything) / len(named), 4) if named else 0.0,
        recall={c: round(len(named & s) / len(s), 4) if s else 0.0 for c, s in categories.items()},
        named_by_category={c: len(named & s) for c, s in categories.items()},
        named_elsewhere=len(named - everything),
        category_sizes={c: len(s) for c, s in categories.items()},
        right_side=right_side,
        seconds=round(seconds, 3),
    )


def run_preference_matrix(
    scenario: PreferenceScenario,
    config: PreferenceConfig,
    progress: Callable[[PreferenceRow], None] | None = None,
) -> list[PreferenceRow]:
    """Every attack on every view of the victim's DPO update (victim = client 0)."""
    n_max = max(config.clients)
    if len(scenario.pairs) < n_max:
        raise AttackInputError(f"{n_max} clients asked for, the scenario has {len(scenario.pairs)}")
    lm, start = global_adapter(scenario.model, config.lora_rank, config.seed)
    pad_id = int(scenario.tokenizer.pad_token_id or 0)
    lm.set_vector(start)
    direction = head_direction(lm.model, scenario.public_texts)
    rows: list[PreferenceRow] = []
    for batch in config.batches:
        tokenized = []
        for client in range(n_max):
            mine = list(scenario.pairs[client][:batch])
            if len(mine) < batch:
                raise AttackInputError(f"client {client} has {len(mine)} pairs, {batch} needed")
            tokenized.append(
                tokenize_pairs(mine, scenario.tokenizer, config.max_length, f"client {client}")
            )
        updates = [
            dpo_update(lm, start, tokenized[c], config, config.seed + c, pad_id)
            for c in range(n_max)
        ]
        categories = token_categories(tokenized[0])
        for n in config.clients:
            for view in config.views:
                observed = _view(view, updates[:n], config)
                for attack in config.attacks:
                    began = time.perf_counter()
                    sides = None
                    if attack == "preference":
                        sides = preference_attack(observed, direction, scenario.vocab_size)
                        named = sides.tokens
                    else:
                        named = token_leakage_attack(observed, scenario.vocab_size).tokens
                    seconds = time.perf_counter() - began
                    row = _row(attack, view, batch, n, named, sides, categories, seconds)
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows


def preference_table(rows: Sequence[PreferenceRow]) -> str:
    """The rows as a markdown table: recall of each category of the victim's tokens."""
    head = (
        "| attack | view | pairs | clients | named | precision | chosen-only recall "
        "| rejected-only recall | both-answers recall | prompt-only recall | right side |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        recall = " | ".join(f"{r.recall[c]:.2f}" for c in CATEGORIES)
        side = "–" if r.right_side is None else f"{r.right_side:.2f}"
        lines.append(
            f"| {r.attack} | {r.view} | {r.batch} | {r.clients} | {r.named} "
            f"| {r.precision:.2f} | {recall} | {side} |"
        )
    return "\n".join(lines)

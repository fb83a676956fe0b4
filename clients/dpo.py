"""Local preference alignment: the DPO loss on the LoRA policy, against a reference adapter.

Direct Preference Optimization (Rafailov et al., NeurIPS'23) trains the policy pi so that, for a
prompt x with a chosen answer y_w and a rejected one y_l,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x))
                                 - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) sums the answer's token log-probabilities. IPO (Azar et al., AISTATS'24) uses
the per-token means of the same log-ratios and the squared loss
``(delta - 1 / (2 beta))^2``, as TRL does (``loss_type="ipo"``; tests/clients/test_dpo.py checks
both losses against TRL's implementation).

The reference is the same base with another LoRA vector: the adapter the DPO stage started from
(``dpo_reference = "sft"``, the recipe's default: after SFT rounds, the SFT adapter), or the
global adapter each round starts from (``"round"``, :func:`train_dpo` without one). It is never
a second copy of the model: before the first step, the LoRA model is set to the reference vector
and the log-probabilities of every pair the round's batches will use are computed once, without
gradients and in eval mode (no LoRA dropout); training then starts from the global vector on the
same model. At the first step, with the reference equal to the start and no dropout, the loss is
exactly log 2.

The training loop is :func:`clients.trainer.optimise`, the same as SFT's: the update, its
encoding and its secure aggregation do not depend on the objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from clients.data import IGNORE_INDEX, TokenizedDataset
from clients.devices import autocast
from clients.preference_data import TokenizedPairs
from clients.trainer import (
    LocalResult,
    LoraModel,
    ScaffoldControls,
    TrainSettings,
    optimise,
    pad_batch,
    plan_batches,
)
from fl_core.errors import FLError
from fl_core.recipe import Recipe

DpoLoss = Literal["sigmoid", "ipo"]
DPO_LOSSES: tuple[DpoLoss, ...] = ("sigmoid", "ipo")


class DpoConfigError(FLError, ValueError):
    """DPO settings that cannot work (beta <= 0, an unknown loss, a reference of another size)."""


@dataclass(frozen=True)
class DpoSettings:
    beta: float = 0.1
    loss: DpoLoss = "sigmoid"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise DpoConfigError(f"DPO beta must be a positive number, got {self.beta}")
        if self.loss not in DPO_LOSSES:
            raise DpoConfigError(f"unknown DPO loss {self.loss!r}; one of {', '.join(DPO_LOSSES)}")

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> DpoSettings:
        return cls(recipe.dpo_beta, recipe.dpo_loss)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    settings: DpoSettings,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each pair, from the answers' summed log-probs under the policy and the
    reference (IPO also needs each answer's token count)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if settings.loss == "sigmoid":
        return -F.logsigmoid(settings.beta * (chosen_ratio - rejected_ratio))
    if chosen_tokens is None or rejected_tokens is None:
        raise DpoConfigError("the IPO loss needs each answer's token count")
    delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
        min=1
    )
    return (delta - 1.0 / (2.0 * settings.beta)) ** 2


def sequence_logps(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the answer tokens' log-probabilities, and how many there are."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    token_logps = -F.cross_entropy(
        logits.float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    valid = target != IGNORE_INDEX
    return (token_logps * valid).sum(dim=1), valid.sum(dim=1)


@dataclass(frozen=True)
class PairLogps:
    """Summed answer log-probs of the chosen and rejected side of each pair, and the answers'
    token counts (float64 numpy, row i = pair i of the scored set)."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray

    @staticmethod
    def concat(parts: Sequence[PairLogps]) -> PairLogps:
        return PairLogps(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in PairLogps.__annotations__)
        )


def _stacked(pairs: TokenizedPairs) -> TokenizedDataset:
    """Chosen rows, then rejected rows: pair i is rows i and i + len(pairs)."""
    return TokenizedDataset(
        pairs.chosen.input_ids + pairs.rejected.input_ids,
        pairs.chosen.labels + pairs.rejected.labels,
        0,
    )


def _both(rows: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([rows, rows + size])


@torch.no_grad()
def pair_logps(
    lm: LoraModel,
    vector: np.ndarray,
    pairs: TokenizedPairs,
    pad_id: int,
    rows: np.ndarray | None = None,
    batch_size: int = 16,
) -> PairLogps:
    """Log-probs of both answers of ``rows`` (default: every pair) under ``vector``, in eval
    mode (no dropout); the result's row i is ``rows[i]``."""
    lm.set_vector(vector)
    lm.model.eval()
    stacked = _stacked(pairs)
    rows = np.arange(len(pairs)) if rows is None else np.asarray(rows)
    parts: list[PairLogps] = []
    for at in range(0, len(rows), batch_size):
        chunk = rows[at : at + batch_size]
        ids, labels, mask = pad_batch(stacked, _both(chunk, len(pairs)), pad_id, lm.runtime.device)
        with autocast(lm.runtime):
            logps, tokens = sequence_logps(lm.model, ids, labels, mask)
        sums = logps.double().cpu().numpy()
        counts = tokens.double().cpu().numpy()
        k = len(chunk)  # the chunk's chosen rows, then its rejected rows
        parts.append(PairLogps(sums[:k], sums[k:], counts[:k], counts[k:]))
    return PairLogps.concat(parts)


def train_dpo(
    lm: LoraModel,
    global_vector: np.ndarray,
    pairs: TokenizedPairs,
    settings: TrainSettings,
    dpo: DpoSettings,
    pad_id: int,
    reference: np.ndarray | None = None,
    scaffold: ScaffoldControls | None = None,
) -> LocalResult:
    """One round of DPO from ``global_vector`` on ``pairs`` (``settings.batch_size`` pairs per
    step) against ``reference`` (default: ``global_vector`` itself); returns the update, whose
    weight (``num_samples``) is the number of pairs."""
    if reference is not None and reference.shape != global_vector.shape:
        raise DpoConfigError(
            f"the DPO reference has {reference.size} coordinates, the model {global_vector.size}"
        )
    batches = plan_batches(len(pairs), settings)
    used = np.unique(np.concatenate(batches))
    # The reference's log-probs of every pair this round uses, once, on the same model.
    ref = pair_logps(
        lm,
        global_vector if reference is None else reference,
        pairs,
        pad_id,
        used,
        max(1, settings.batch_size // settings.grad_accum),
    )
    position = {int(row): i for i, row in enumerate(used)}
    ref_chosen = torch.from_numpy(ref.chosen)
    ref_rejected = torch.from_numpy(ref.rejected)
    stacked = _stacked(pairs)
    device = lm.runtime.device

    def loss_of(micro: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        at = torch.tensor([position[int(r)] for r in micro])
        ids, labels, mask = pad_batch(stacked, _both(micro, len(pairs)), pad_id, device)
        with autocast(lm.runtime):
            logps, tokens = sequence_logps(lm.model, ids, labels, mask)
        k = len(micro)
        losses = dpo_loss(
            logps[:k],
            logps[k:],
            ref_chosen[at].to(device, logps.dtype),
            ref_rejected[at].to(device, logps.dtype),
            dpo,
            tokens[:k],
            tokens[k:],
        )
        return losses.sum() / len(batch)  # the mean over the whole batch's pairs

    return optimise(lm, global_vector, len(pairs), batches, settings, loss_of, scaffold)


@dataclass(frozen=True)
class PreferenceScore:
    """How a policy ranks held-out pairs, against a fixed reference.

    ``accuracy``: the share of pairs whose chosen log-ratio (log pi - log ref) beats the rejected
    one, a tie counting one half (at the reference itself every pair ties: 0.5, chance);
    ``margin``: the mean reward margin beta * (chosen log-ratio - rejected log-ratio);
    ``chosen_reward``/``rejected_reward``: the mean beta * log-ratio of each side;
    ``logp_accuracy``: the share of pairs whose chosen answer is more likely than the rejected
    one under the policy alone (no reference; ties one half).
    """

    accuracy: float
    margin: float
    chosen_reward: float
    rejected_reward: float
    logp_accuracy: float
    pairs: int

    def to_json(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "margin": self.margin,
            "chosen_reward": self.chosen_reward,
            "rejected_reward": self.rejected_reward,
            "logp_accuracy": self.logp_accuracy,
            "pairs": self.pairs,
        }


def _wins(difference: np.ndarray) -> np.ndarray:
    return np.where(difference > 0, 1.0, np.where(difference == 0, 0.5, 0.0))


def pair_outcomes(policy: PairLogps, reference: PairLogps) -> np.ndarray:
    """Per pair: 1 where the chosen answer's log-ratio (policy against reference) beats the
    rejected one's, 0.5 on a tie, 0 otherwise; their mean is :attr:`PreferenceScore.accuracy`."""
    if policy.chosen.shape != reference.chosen.shape:
        raise DpoConfigError("policy and reference log-probs are of different pair sets")
    return _wins((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))


def score_preferences(policy: PairLogps, reference: PairLogps, beta: float) -> PreferenceScore:
    """Reward accuracy and margin of ``policy`` against ``reference`` on the same pairs."""
    outcomes = pair_outcomes(policy, reference)
    chosen = beta * (policy.chosen - reference.chosen)
    rejected = beta * (policy.rejected - reference.rejected)
    return PreferenceScore(
        accuracy=float(np.mean(outcomes)),
        margin=float(np.mean(chosen - rejected)),
        chosen_reward=float(np.mean(chosen)),
        rejected_reward=float(np.mean(rejected)),
        logp_accuracy=float(np.mean(_wins(policy.chosen - policy.rejected))),
        pairs=int(policy.chosen.size),
    )

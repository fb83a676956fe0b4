"""View ``split_activations``: what the server of split learning sees, turned back into tokens.

In split learning (:mod:`fl_core.split`) an institution sends the server, at every step, the
activation ``h_k`` entering the server's first block (rows x tokens x hidden, and the row
lengths), plus the gradient at the top cut. This module measures how much of the institution's
text the activation gives away.

The attacker is the server. It holds the public base model and the global client part (the
released average of the institutions' parts: it learns that sum, as in LoRA FedAvg), so it can
run the institution's bottom itself; it does not know the institution's drift within the
current round, nor its noise (only the noise's public ratio). Three attacks:

* ``nearest_embedding`` (k = 0): each position's activation is the token's input embedding;
  name the vocabulary row nearest in L2 (under Gaussian noise of one variance per position, the
  maximum-likelihood token). Exact for models whose block 0 reads the token embedding alone
  (Llama, Mistral, Qwen2); models that add learned positions first (GPT-2, OPT) need ``greedy``.
* ``greedy`` (any k): position by position, the vocabulary token whose bottom activation at that
  position, after the tokens already recovered, is nearest to the observed one. Attention is
  causal, so position t depends on tokens 0..t only: without noise and with the attacker's bottom
  equal to the institution's, every step is exact; with noise each step is the most likely token
  given the recovered prefix (an early error can propagate).
* ``optimisation`` (k >= 1): the relaxation of :mod:`proofs.attacks.optimisation` (soft tokens,
  a softmax over the vocabulary per position, Adam) matching activations instead of gradients.

Scores use :mod:`proofs.attacks.metrics`: token precision/recall over the distinct tokens of the
attacked positions, chance recall (the better of a uniform guesser and an informed one with a
public prior, at the same number of guesses), and the fraction of positions recovered exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clients.split.model import SplitModel, activation_noise, pad_mask
from fl_core.updates import DTYPE
from proofs.attacks.errors import AttackInputError
from proofs.attacks.metrics import batch_rouge_l, chance_recall, token_scores
from proofs.attacks.result import Reconstruction

VIEW = "split_activations"
ATTACKS = ("nearest_embedding", "greedy", "optimisation")
#: Candidate sequences per forward pass of the greedy search (bounds its memory).
GREEDY_CHUNK = 1024


@dataclass(frozen=True)
class ActivationView:
    """One step's activation as the server received it."""

    activation: np.ndarray  # rows x tokens x hidden, float32 (noise included)
    lengths: np.ndarray  # tokens per row (right padding)
    depth: int  # k: blocks the institution ran before sending
    noise: float  # the institution's noise-to-signal ratio (public)

    def __post_init__(self) -> None:
        if self.activation.ndim != 3 or len(self.lengths) != self.activation.shape[0]:
            raise AttackInputError(
                f"need a rows x tokens x hidden activation with one length per row, got "
                f"{self.activation.shape} and {len(self.lengths)} lengths"
            )


def split_activation_view(
    institution: SplitModel, ids: torch.Tensor, mask: torch.Tensor, noise: float
) -> ActivationView:
    """What the server receives when ``institution`` (its own model, its own LoRA) sends the
    batch ``ids``: the bottom activation plus the relay's noise
    (:func:`clients.split.model.activation_noise`, the very function the relay calls)."""
    with torch.no_grad():
        activation = institution.bottom_activation(mask, ids=ids).numpy().astype(DTYPE)
    if noise > 0:
        activation = activation + activation_noise(activation, noise)
    lengths = mask.sum(dim=1).numpy().astype(np.int64)
    return ActivationView(activation, lengths, institution.spec.client_bottom, noise)


def _positions(view: ActivationView, length: int) -> list[int]:
    """Tokens attacked per row: the first ``length`` real ones."""
    return [min(int(n), length) for n in view.lengths]


def nearest_embedding_attack(
    view: ActivationView, attacker: SplitModel, length: int
) -> Reconstruction:
    """k = 0: the nearest row of the attacker's block-0 input table, per position."""
    if view.depth != 0:
        raise AttackInputError(
            f"nearest-embedding inversion reads block 0's input; this view is after {view.depth} "
            "blocks (use greedy or optimisation)"
        )
    vocab = _vocab_size(attacker)
    with torch.no_grad():
        table = attacker.bottom_activation(
            torch.ones((vocab, 1), dtype=torch.long), ids=torch.arange(vocab)[:, None]
        )[:, 0, :]
    table64 = table.to(torch.float64)
    rows = []
    for row, n in enumerate(_positions(view, length)):
        observed = torch.from_numpy(view.activation[row, :n]).to(torch.float64)
        rows.append(tuple(int(t) for t in torch.cdist(observed, table64).argmin(dim=1)))
    return _reconstruction(rows, "nearest block-0 input per position")


def greedy_attack(view: ActivationView, attacker: SplitModel, length: int) -> Reconstruction:
    """Left to right, the token whose activation (after the recovered prefix) is nearest."""
    vocab = _vocab_size(attacker)
    candidates = torch.arange(vocab)
    rows = []
    with torch.no_grad():
        for row, n in enumerate(_positions(view, length)):
            prefix: list[int] = []
            observed = torch.from_numpy(view.activation[row, :n]).to(torch.float64)
            for t in range(n):
                best, best_distance = 0, float("inf")
                for start in range(0, vocab, GREEDY_CHUNK):
                    chunk = candidates[start : start + GREEDY_CHUNK]
                    ids = torch.tensor(prefix, dtype=torch.long).repeat(len(chunk), 1)
                    ids = torch.cat([ids, chunk[:, None]], dim=1)
                    out = attacker.bottom_activation(torch.ones_like(ids), ids=ids)[:, t, :]
                    distance = (out.to(torch.float64) - observed[t]).pow(2).sum(dim=1)
                    at = int(distance.argmin())
                    if float(distance[at]) < best_distance:
                        best, best_distance = start + at, float(distance[at])
                prefix.append(best)
            rows.append(tuple(prefix))
    return _reconstruction(rows, "greedy nearest activation, position by position")


def optimisation_attack(
    view: ActivationView,
    attacker: SplitModel,
    length: int,
    steps: int = 300,
    learning_rate: float = 1.0,
    seed: int = 0,
) -> Reconstruction:
    """Soft tokens whose bottom activation matches the observed one (relative squared error per
    position), optimised with Adam; then the most likely token at each position."""
    if steps < 1:
        raise AttackInputError(f"need at least one optimisation step, got {steps}")
    vocab = _vocab_size(attacker)
    embedding = attacker.lm.model.get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        raise AttackInputError("the model exposes no input embedding table")
    table = embedding.weight.detach()
    counts = _positions(view, length)
    width = max(counts)
    mask = pad_mask(counts, width)
    target = torch.from_numpy(view.activation[:, :width]).to(torch.float32)
    valid = mask.bool()
    scale = target.pow(2).sum(-1).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    logits = (0.1 * torch.randn(len(counts), width, vocab, generator=generator)).requires_grad_()
    optimiser = torch.optim.Adam([logits], lr=learning_rate)
    attacker.lm.model.eval()
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        embeds = torch.softmax(logits, dim=-1) @ table
        out = attacker.bottom_activation(mask, embeds=embeds)
        error = (out - target).pow(2).sum(-1) / scale
        loss = error[valid].mean()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    attacker.lm.model.zero_grad(set_to_none=True)
    guessed = logits.detach().argmax(-1)
    rows = [tuple(int(t) for t in guessed[r, :n]) for r, n in enumerate(counts)]
    return _reconstruction(rows, f"{steps} Adam steps on soft tokens matching activations")


def _vocab_size(model: SplitModel) -> int:
    embedding = model.lm.model.get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        raise AttackInputError("the model exposes no input embedding table")
    return int(embedding.weight.shape[0])


def _reconstruction(rows: Sequence[tuple[int, ...]], detail: str) -> Reconstruction:
    return Reconstruction(frozenset(t for row in rows for t in row), tuple(rows), detail)


def run_attack(
    attack: str,
    view: ActivationView,
    attacker: SplitModel,
    length: int,
    optimisation_steps: int = 300,
    seed: int = 0,
) -> Reconstruction:
    if attack == "nearest_embedding":
        return nearest_embedding_attack(view, attacker, length)
    if attack == "greedy":
        return greedy_attack(view, attacker, length)
    if attack == "optimisation":
        return optimisation_attack(view, attacker, length, optimisation_steps, seed=seed)
    raise AttackInputError(f"unknown split attack {attack!r}; choose from {', '.join(ATTACKS)}")


@dataclass(frozen=True)
class ActivationScore:
    token_precision: float
    token_recall: float
    position_accuracy: float  # fraction of attacked positions recovered exactly
    rouge_l: float
    chance_recall: float
    recovered: int  # distinct tokens named


def score(
    result: Reconstruction,
    ids: torch.Tensor,
    view: ActivationView,
    length: int,
    vocab_size: int,
    prior: Counter[int],
) -> ActivationScore:
    """Score a reconstruction against the true tokens of the attacked positions."""
    counts = _positions(view, length)
    truth_rows = [tuple(int(t) for t in ids[r, :n]) for r, n in enumerate(counts)]
    truth = {t for row in truth_rows for t in row}
    scores = token_scores(result.tokens, truth)
    hits = sum(
        int(a == b)
        for got, want in zip(result.sequences, truth_rows, strict=True)
        for a, b in zip(got, want, strict=True)
    )
    return ActivationScore(
        token_precision=round(scores.precision, 4),
        token_recall=round(scores.recall, 4),
        position_accuracy=round(hits / sum(counts), 4),
        rouge_l=round(batch_rouge_l(result.sequences, truth_rows), 4),
        chance_recall=round(chance_recall(len(result.tokens), truth, vocab_size, prior), 4),
        recovered=len(result.tokens),
    )

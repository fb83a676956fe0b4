"""Span-membership attack on linear-layer updates, in the spirit of DAGER (Petrov et al. 2024).

A linear layer y = W x has ∂L/∂W = Σ_t δ_t x_tᵀ, so every row of the observed update lies in
span{x_t}, the inputs the layer saw. At block 0 the input of a token is the block's input norm
applied to its embedding, independent of position, so the attacker (who holds the global
model) can compute that input for every vocabulary entry and test it for membership:

1. stack the rows of block 0's q/k/v updates (full weights, or the LoRA A matrices, whose rows
   are combinations of the same inputs), and take their row space by SVD with a relative rank
   threshold;
2. a token is recovered when the relative residual of its normed embedding outside that space
   is below a tolerance.

The test is informative only while the span is a proper subspace: once the number of distinct
tokens (or, for LoRA, 3r) reaches the hidden width, the span fills the whole space and every
token "is a member". The attack then says so and names nothing, which is what happens on a
masked vector, under DP noise, and for large batches or large cohorts of a narrow model.

Order (where the architecture allows): block 1 sees position-dependent inputs that depend on
the prefix (causal attention), so a prefix followed by a candidate token is accepted when the
block-1 input at its last position lies in the span of block 1's update. Prefixes grow one
token at a time from the recovered set (a beam search), which recovers whole sequences as long
as block 1's span is also proper (fewer positions in the batch than the hidden width).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from proofs.attacks.errors import AttackInputError
from proofs.attacks.model_access import (
    Array,
    Update,
    attention_input_rows,
    block_inputs,
    normed_vocabulary,
)
from proofs.attacks.result import Reconstruction

#: Singular values below this fraction of the largest are rounding noise of float32 training.
RANK_TOLERANCE = 1e-5
#: Relative residual below which a vector counts as inside the span.
RESIDUAL_TOLERANCE = 1e-3
#: Most prefixes kept per position by the ordering search.
BEAM_WIDTH = 256


def row_space(rows: Array, rank_tolerance: float = RANK_TOLERANCE) -> Array:
    """Orthonormal basis (hidden × rank) of the row space of ``rows``."""
    if not np.isfinite(rows).all():
        raise AttackInputError("the update contains NaN or Inf")
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    if singular.size == 0 or singular[0] == 0.0:
        return np.zeros((rows.shape[1], 0))
    rank = int(np.count_nonzero(singular > rank_tolerance * singular[0]))
    basis: Array = vt[:rank].T
    return basis


def relative_residuals(vectors: Array, basis: Array) -> Array:
    """‖v − P v‖ / ‖v‖ for each row v, P the projection onto the basis' span."""
    projected = (vectors @ basis) @ basis.T
    norms = np.linalg.norm(vectors, axis=1)
    residual: Array = np.linalg.norm(vectors - projected, axis=1) / np.maximum(norms, 1e-30)
    # A zero vector (a padding token's embedding) lies in every span and says nothing.
    residual[norms == 0.0] = 1.0
    return residual


def span_attack(
    update: Update,
    model: nn.Module,
    *,
    lora: bool,
    order: bool = True,
    max_length: int = 256,
    residual_tolerance: float = RESIDUAL_TOLERANCE,
    rank_tolerance: float = RANK_TOLERANCE,
) -> Reconstruction:
    """Recover the victim's tokens (and, if ``order``, sequences) from block 0/1 updates.

    ``lora`` selects which tensors to read: the full q/k/v weights (their gradient, e.g. in
    FedSGD or full fine-tuning) or the LoRA A matrices of a LoRA update.
    """
    rows = attention_input_rows(update, 0, lora)
    kind = "LoRA A" if lora else "q/k/v weight"
    if rows is None:
        raise AttackInputError(f"the update has no block-0 {kind} tensor to attack")
    vocab = normed_vocabulary(model)
    hidden = vocab.shape[1]
    if rows.shape[1] != hidden:
        raise AttackInputError(
            f"block-0 {kind} rows have width {rows.shape[1]}, the model's hidden size is {hidden}"
        )
    basis = row_space(rows, rank_tolerance)
    rank = basis.shape[1]
    if rank == 0:
        return Reconstruction.nothing(f"block-0 {kind} update is zero")
    if rank >= hidden:
        return Reconstruction.nothing(
            f"block-0 {kind} span has full rank {rank}: membership carries no information"
        )
    residual = relative_residuals(vocab, basis)
    members = np.flatnonzero(residual < residual_tolerance)
    members = members[np.argsort(residual[members], kind="stable")]
    tokens = tuple(int(t) for t in members)
    detail = f"block-0 {kind} span rank {rank} of {hidden}: {len(tokens)} member tokens"
    if not tokens:
        return Reconstruction.nothing(detail)
    if order:
        ordered = _order_sequences(
            update, model, tokens, lora, max_length, residual_tolerance, rank_tolerance
        )
        if ordered is not None:
            sequences, note = ordered
            return Reconstruction(frozenset(tokens), sequences, f"{detail}; {note}")
        detail += "; no order (block-1 span missing or full, or no prefix fits it)"
    return Reconstruction(frozenset(tokens), (tokens,), detail)


@torch.no_grad()
def _order_sequences(
    update: Update,
    model: nn.Module,
    tokens: tuple[int, ...],
    lora: bool,
    max_length: int,
    residual_tolerance: float,
    rank_tolerance: float,
) -> tuple[tuple[tuple[int, ...], ...], str] | None:
    rows = attention_input_rows(update, 1, lora)
    if rows is None:
        return None
    basis = row_space(rows, rank_tolerance)
    if basis.shape[1] == 0 or basis.shape[1] >= rows.shape[1]:
        return None
    candidates = torch.tensor(tokens, dtype=torch.long)
    prefixes = torch.empty((1, 0), dtype=torch.long)
    finished: list[tuple[int, ...]] = []
    while prefixes.shape[0] and prefixes.shape[1] < max_length:
        # Every prefix extended by every candidate, as one batch.
        n_pref, n_cand = prefixes.shape[0], candidates.numel()
        grown = torch.cat(
            [prefixes.repeat_interleave(n_cand, 0), candidates.repeat(n_pref).unsqueeze(1)], 1
        )
        states = block_inputs(model, grown, 1).to(torch.float64).numpy()
        residual = relative_residuals(states[:, -1, :], basis)
        if grown.shape[1] > 1:
            # A token repeated after a run of itself reproduces the previous position's input
            # exactly (attention averages identical values), so the test cannot tell how long
            # the run is; such an extension is no evidence and is not taken.
            step = np.linalg.norm(states[:, -1, :] - states[:, -2, :], axis=1)
            residual[step <= 1e-6 * np.linalg.norm(states[:, -1, :], axis=1)] = np.inf
        accepted = np.flatnonzero(residual < residual_tolerance)
        extended = {int(i) // n_cand for i in accepted}
        finished += [tuple(int(t) for t in prefixes[p]) for p in range(n_pref) if p not in extended]
        accepted = accepted[np.argsort(residual[accepted], kind="stable")][:BEAM_WIDTH]
        prefixes = grown[torch.as_tensor(accepted, dtype=torch.long)]
    finished += [tuple(int(t) for t in p) for p in prefixes]
    sequences = tuple(s for s in dict.fromkeys(finished) if s)
    if not sequences:
        return None
    longest = max(len(s) for s in sequences)
    return sequences, f"{len(sequences)} ordered sequence(s), longest {longest} tokens"

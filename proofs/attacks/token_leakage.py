"""Token-set leakage from the embedding / LM-head gradient (when those are trained).

Why it works: the gradient of an input embedding table is non-zero only in the rows of tokens
that occur in the input, and the gradient of an LM-head row is dominated by the hidden states
at positions where that row's token is the label (−(1 − p)·h_t) rather than by the small
softmax mass every other row receives (p·h_t with p ≈ 1/V). With tied embeddings (one matrix
for both) the two effects add up. Either way the rows of the victim's tokens are outliers in
row norm.

The decision rule is a robust outlier test on row norms (median and MAD), so it is the same
rule for every view: exactly-zero rows are never selected, and a view that is uniform noise
(a masked vector) or noise that dominates the signal (strong DP) yields few or no outliers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from proofs.attacks.errors import AttackInputError
from proofs.attacks.model_access import Array, Update
from proofs.attacks.result import Reconstruction

#: Names of the tensors whose rows are indexed by token id.
VOCAB_TENSOR_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    # LoRA on the LM head: ∂L/∂B = s·Σ_t (p_t − y_t)(A h_t)ᵀ has one row per token too.
    "lm_head.lora_B.weight",
    "lm_head.lora_B.default.weight",
)
#: Robust z-score above which a row counts as an outlier (far in the tail of any noise).
Z_THRESHOLD = 8.0
#: MAD's consistency constant for normally distributed norms.
_MAD_TO_SIGMA = 1.4826


def vocabulary_row_norms(update: Update, vocab_size: int) -> Array:
    """Root of the summed squared row norms of every vocabulary-indexed tensor in the update."""
    total = np.zeros(vocab_size, dtype=np.float64)
    found = False
    for name, value in update.items():
        if not name.endswith(VOCAB_TENSOR_SUFFIXES):
            continue
        if value.ndim != 2 or value.shape[0] != vocab_size:
            raise AttackInputError(
                f"{name}: expected {vocab_size} rows (one per token), got shape {value.shape}"
            )
        total += np.einsum("ij,ij->i", value, value)
        found = True
    if not found:
        raise AttackInputError(
            "the update has no embedding or LM-head tensor (names ending in "
            f"{', '.join(VOCAB_TENSOR_SUFFIXES)}); token-set leakage needs them to be trained"
        )
    return np.sqrt(total)


def outlier_rows(norms: Array, z_threshold: float = Z_THRESHOLD) -> npt.NDArray[np.intp]:
    """Indices of rows whose norm is a robust outlier above the bulk of rows."""
    top = float(norms.max(initial=0.0))
    if top == 0.0:
        return np.empty(0, dtype=np.int64)
    median = float(np.median(norms))
    mad = float(np.median(np.abs(norms - median)))
    # Float32 training leaves exact zeros where a row got no gradient; treat anything within
    # rounding of the bulk as part of it.
    floor = 1e-6 * top
    if mad * _MAD_TO_SIGMA <= floor:
        return np.flatnonzero(norms > median + floor)
    z = (norms - median) / (_MAD_TO_SIGMA * mad)
    return np.flatnonzero(z > z_threshold)


def token_leakage_attack(
    update: Update, vocab_size: int, z_threshold: float = Z_THRESHOLD
) -> Reconstruction:
    """Name the tokens whose embedding/LM-head rows stand out of the update."""
    norms = vocabulary_row_norms(update, vocab_size)
    picked = outlier_rows(norms, z_threshold)
    order = picked[np.argsort(-norms[picked], kind="stable")]
    tokens = tuple(int(t) for t in order)
    detail = f"{len(tokens)} of {vocab_size} vocabulary rows are norm outliers"
    return Reconstruction(frozenset(tokens), (tokens,) if tokens else (), detail)

"""Token-set leakage from the embedding / LM-head gradient (when those are trained).

Why it works: the gradient of an input embedding table is non-zero only in the rows of tokens
that occur in the input (with tied embeddings the head's small dense term is added, which the
outlier test below absorbs). Without an embedding gradient, an LM-head row (or its LoRA B row)
receives p_tv·h_t from every position, and a label token's row additionally −h_t where it is
the label, which pulls it against the direction all other rows share (see :func:`row_scores`).

The decision rule is a robust outlier test on those scores (median and MAD), the same rule for
every view: exactly-zero rows are never selected, and a view that is uniform noise (a masked
vector) or noise that dominates the signal (strong DP) yields few or no outliers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from proofs.attacks.errors import AttackInputError
from proofs.attacks.model_access import Array, Update
from proofs.attacks.result import Reconstruction

#: Input-embedding tables: a row's gradient is exactly zero unless its token is in the input.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight")
#: Output-head tensors with one row per token: the full head, or the B matrix of its LoRA
#: adapter (∂L/∂B = s·Σ_t (p_t − y_t)(A h_t)ᵀ).
HEAD_SUFFIXES = ("lm_head.weight", "lm_head.lora_B.weight", "lm_head.lora_B.default.weight")
#: Robust z-score above which a row counts as an outlier (far in the tail of any noise).
Z_THRESHOLD = 8.0
#: MAD's consistency constant for normally distributed scores.
_MAD_TO_SIGMA = 1.4826


def vocabulary_rows(update: Update, vocab_size: int, suffixes: tuple[str, ...]) -> Array | None:
    """The token-indexed tensors with those name suffixes, side by side (None if none)."""
    parts = []
    for name, value in update.items():
        if not name.endswith(suffixes):
            continue
        if value.ndim != 2 or value.shape[0] != vocab_size:
            raise AttackInputError(
                f"{name}: expected {vocab_size} rows (one per token), got shape {value.shape}"
            )
        parts.append(np.asarray(value, dtype=np.float64))
    return np.concatenate(parts, axis=1) if parts else None


def row_scores(update: Update, vocab_size: int) -> Array:
    """One score per token; the victim's tokens are the high outliers.

    With an input-embedding gradient the score is the row norm (zero for absent tokens). With
    only an output head, every row receives p_tv·h_t from each position, so the rows of tokens
    that are never labels all point the same way (the bulk direction, estimated by the
    coordinate-wise median row), while a label token's row is pulled the opposite way by
    −(1 − p)·h_t; the score is the projection onto minus the bulk direction.
    """
    embedding = vocabulary_rows(update, vocab_size, EMBEDDING_SUFFIXES)
    if embedding is not None:
        norms: Array = np.linalg.norm(embedding, axis=1)
        return norms
    head = vocabulary_rows(update, vocab_size, HEAD_SUFFIXES)
    if head is None:
        raise AttackInputError(
            "the update has no embedding or LM-head tensor (names ending in "
            f"{', '.join(EMBEDDING_SUFFIXES + HEAD_SUFFIXES)}); token-set leakage needs "
            "them to be trained"
        )
    bulk = np.median(head, axis=0)
    size = float(np.linalg.norm(bulk))
    if size == 0.0:
        return np.zeros(vocab_size)
    projection: Array = -(head @ (bulk / size))
    return projection


def outlier_rows(scores: Array, z_threshold: float = Z_THRESHOLD) -> npt.NDArray[np.intp]:
    """Indices of scores that are robust outliers above the bulk (median and MAD)."""
    top = float(np.abs(scores).max(initial=0.0))
    if top == 0.0:
        return np.empty(0, dtype=np.intp)
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median)))
    # Float32 training leaves exact zeros where a row got no gradient; treat anything within
    # rounding of the bulk as part of it.
    floor = 1e-6 * top
    if mad * _MAD_TO_SIGMA <= floor:
        return np.flatnonzero(scores > median + floor)
    z = (scores - median) / (_MAD_TO_SIGMA * mad)
    return np.flatnonzero(z > z_threshold)


def token_leakage_attack(
    update: Update, vocab_size: int, z_threshold: float = Z_THRESHOLD
) -> Reconstruction:
    """Name the tokens whose embedding/LM-head rows stand out of the update."""
    scores = row_scores(update, vocab_size)
    picked = outlier_rows(scores, z_threshold)
    order = picked[np.argsort(-scores[picked], kind="stable")]
    tokens = tuple(int(t) for t in order)
    detail = f"{len(tokens)} of {vocab_size} vocabulary rows are outliers"
    return Reconstruction(frozenset(tokens), (tokens,) if tokens else (), detail)

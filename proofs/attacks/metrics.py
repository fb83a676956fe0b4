"""How much of the true text an attack got back: token precision/recall, ROUGE-L, chance.

All metrics work on token ids, so they need no tokenizer and cannot be fooled by decoding.

* Token precision and recall compare the *set* of distinct token ids an attack names with the
  set of distinct ids in the victim's text (or batch of texts).
* ROUGE-L (Lin, 2004) is the F1 of the longest common subsequence between a reconstructed
  sequence and a true one. For a batch, each true sequence is matched with its best
  reconstruction and the F1 values are averaged; an attack that names tokens but no order
  scores low here, which is the point.
* Chance recall is what an attacker who only guesses achieves with the same number of guesses;
  an attack "leaks" in a setting only if its recall is clearly above it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from proofs.attacks.errors import AttackInputError


@dataclass(frozen=True)
class TokenScores:
    precision: float
    recall: float


def token_scores(recovered: Iterable[int], true_tokens: Iterable[int]) -> TokenScores:
    """Precision and recall of the distinct recovered ids against the distinct true ids.

    An empty guess has precision 0 (it names nothing correctly), not an undefined value, so
    tables and JSON stay numeric.
    """
    guess = set(recovered)
    truth = set(true_tokens)
    if not truth:
        raise AttackInputError("the true text has no tokens; there is nothing to score against")
    hits = len(guess & truth)
    precision = hits / len(guess) if guess else 0.0
    return TokenScores(precision, hits / len(truth))


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence, one numpy row per token of ``a``.

    The row update ``row[j] = max(prev[j-1] + eq[j], prev[j], row[j-1])`` has a dependency along
    j only through a running maximum, which ``np.maximum.accumulate`` computes in one call.
    """
    if not a or not b:
        return 0
    bb = np.asarray(b, dtype=np.int64)
    prev = np.zeros(len(bb) + 1, dtype=np.int64)
    for token in a:
        diag = prev[:-1] + (bb == token)
        row = np.empty_like(prev)
        row[0] = 0
        row[1:] = np.maximum(diag, prev[1:])
        prev = np.maximum.accumulate(row)
    return int(prev[-1])


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 (β = 1) of one candidate sequence against one reference sequence."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision = lcs / len(candidate)
    recall = lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def batch_rouge_l(
    candidates: Sequence[Sequence[int]], references: Sequence[Sequence[int]]
) -> float:
    """Mean over the true sequences of the best ROUGE-L F1 any reconstruction achieves."""
    if not references:
        raise AttackInputError("no reference sequences to score against")
    if not candidates:
        return 0.0
    best = [max(rouge_l(c, ref) for c in candidates) for ref in references]
    return float(np.mean(best))


def chance_recall(
    guesses: int,
    true_tokens: Iterable[int],
    vocab_size: int,
    prior_counts: Counter[int] | None = None,
) -> float:
    """Recall of the better of two attackers that never look at the update.

    Both name ``guesses`` tokens, the number the real attack named:

    * a uniform random set of that size, whose expected recall is exactly
      ``guesses / vocab_size`` for any true text;
    * the ``guesses`` most frequent tokens of a public prior corpus (``prior_counts``, text
      from the same domain but not the victim's), which is what an informed guesser does and is
      much stronger than uniform guessing for natural text.

    Comparing an attack with this baseline at the same number of guesses makes "name every
    token" score chance, not success.
    """
    if vocab_size < 1:
        raise AttackInputError(f"vocab_size must be positive, got {vocab_size}")
    if guesses < 0:
        raise AttackInputError(f"the number of guesses cannot be negative, got {guesses}")
    truth = set(true_tokens)
    if not truth:
        raise AttackInputError("the true text has no tokens; there is nothing to score against")
    k = min(guesses, vocab_size)
    uniform = k / vocab_size
    if not prior_counts or k == 0:
        return uniform
    ranked = [token for token, _ in prior_counts.most_common(k)]
    if len(ranked) < k:
        # Fill up with tokens the prior never saw; in expectation each hits with uniform odds.
        unseen_truth = len(truth - set(ranked))
        spare = vocab_size - len(ranked)
        extra = (k - len(ranked)) * unseen_truth / spare if spare else 0.0
    else:
        extra = 0.0
    informed = (len(truth & set(ranked)) + extra) / len(truth)
    return max(uniform, informed)

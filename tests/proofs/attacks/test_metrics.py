from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proofs.attacks.errors import AttackInputError
from proofs.attacks.metrics import (
    batch_rouge_l,
    chance_recall,
    lcs_length,
    rouge_l,
    token_scores,
)


def _lcs_reference(a: list[int], b: list[int]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


@given(
    st.lists(st.integers(0, 5), max_size=12),
    st.lists(st.integers(0, 5), max_size=12),
)
def test_lcs_matches_textbook_dynamic_programme(a: list[int], b: list[int]) -> None:
    assert lcs_length(a, b) == _lcs_reference(a, b)


def test_rouge_l_known_values() -> None:
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([4, 5], [1, 2, 3]) == 0.0
    # LCS 2 of candidate 4 and reference 2: P = 1/2, R = 1, F1 = 2/3.
    assert rouge_l([1, 9, 2, 9], [1, 2]) == pytest.approx(2 / 3)
    # A bag of the right tokens in the wrong order scores low.
    assert rouge_l([5, 4, 3, 2, 1], [1, 2, 3, 4, 5]) == pytest.approx(0.2)


def test_batch_rouge_l_matches_each_reference_to_its_best_candidate() -> None:
    refs = [[1, 2, 3], [7, 8, 9]]
    assert batch_rouge_l([[7, 8, 9], [1, 2, 3]], refs) == 1.0
    assert batch_rouge_l([[1, 2, 3]], refs) == pytest.approx(0.5)
    assert batch_rouge_l([], refs) == 0.0


def test_token_scores_on_sets() -> None:
    scores = token_scores([1, 2, 2, 5], [1, 2, 3, 4])
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(0.5)
    assert token_scores([], [1]).precision == 0.0
    with pytest.raises(AttackInputError):
        token_scores([1], [])


def test_chance_recall_uniform_and_informed() -> None:
    truth = [1, 2, 3, 4]
    assert chance_recall(10, truth, 100) == pytest.approx(0.1)
    assert chance_recall(0, truth, 100) == 0.0
    # Naming the whole vocabulary is chance, not success.
    assert chance_recall(100, truth, 100) == 1.0
    prior = Counter({1: 50, 2: 40, 9: 30})
    # Two guesses from the prior (1 and 2) hit half of the true tokens.
    assert chance_recall(2, truth, 100, prior) == pytest.approx(0.5)
    # Five guesses: three from the prior (1, 2 hit), two spare among 97 unseen ids hitting
    # the two remaining true tokens with probability 2/97 each.
    assert chance_recall(5, truth, 100, prior) == pytest.approx((2 + 2 * 2 / 97) / 4)
    with pytest.raises(AttackInputError):
        chance_recall(-1, truth, 100)

"""What a privacy officer relies on, asserted on the embedded model with a batch of one text.

* Each attack recovers most of the victim's tokens from its plaintext update (view a): the
  attacks are real, so the negative results below mean something (at least 80% for the
  token-set and span attacks, at least 60% for the optimisation attack).
* The secagg-masked vector (view b) and the DP aggregate at ε = 8 (view d) give nothing beyond
  what guessing with the same number of guesses achieves.
* The plain secure sum (view c) is measured: it still names the union of the clients' tokens,
  without saying who wrote which.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proofs.attacks.errors import AttackInputError
from proofs.attacks.matrix import MatrixConfig, MatrixRow, Scenario, run_matrix
from proofs.attacks.metrics import token_scores
from proofs.attacks.model_access import to_update
from proofs.attacks.span import span_attack
from proofs.attacks.token_leakage import token_leakage_attack

FAST_ATTACKS = ("token_leakage", "token_leakage_lora", "span", "span_lora")
#: How far above chance recall a "nothing beyond chance" view may land (sampling slack).
MARGIN = 0.1

Rows = dict[tuple[str, str], MatrixRow]


@pytest.mark.parametrize("attack", FAST_ATTACKS)
def test_attack_recovers_most_tokens_of_a_plaintext_update(
    batch_one_rows: Rows, attack: str
) -> None:
    row = batch_one_rows[(attack, "plaintext")]
    assert row.token_recall >= 0.8, row
    assert row.token_precision >= 0.8, row
    assert row.token_recall >= row.chance_recall + 0.2, row


def test_span_attack_recovers_the_order_of_a_single_text(batch_one_rows: Rows) -> None:
    assert batch_one_rows[("span", "plaintext")].rouge_l >= 0.8


@pytest.mark.parametrize("attack", FAST_ATTACKS)
@pytest.mark.parametrize("view", ["masked", "aggregate_dp"])
def test_masked_and_dp_views_give_nothing_beyond_chance(
    batch_one_rows: Rows, attack: str, view: str
) -> None:
    row = batch_one_rows[(attack, view)]
    assert row.token_recall <= row.chance_recall + MARGIN, row


def test_secure_sum_reveals_the_union_but_not_who_wrote_it(batch_one_rows: Rows) -> None:
    row = batch_one_rows[("token_leakage", "aggregate")]
    assert row.union_recall is not None and row.union_recall >= 0.8
    # The other client's tokens are named too: the victim's own text is not singled out.
    assert row.token_precision < 0.9


def test_optimisation_attack_on_plaintext_masked_and_dp(scenario: Scenario) -> None:
    rows = run_matrix(
        scenario,
        MatrixConfig(batches=(1,), clients=(2,), attacks=("optimisation",)),
    )
    by_view = {r.view: r for r in rows}
    plain = by_view["plaintext"]
    # Measured 0.65-0.82 across seeds and tokenizers (0.82 here): the optimisation attack is the
    # weakest of the suite and does not reliably reach the 0.8 the other attacks clear, so the
    # bar here is "most tokens, far above chance", not a seed picked to pass 0.8.
    assert plain.token_recall >= 0.6, plain
    assert plain.token_recall >= plain.chance_recall + 0.2, plain
    for view in ("masked", "aggregate_dp"):
        assert by_view[view].token_recall <= by_view[view].chance_recall + MARGIN, by_view[view]


def _single_update(scenario: Scenario, length: int = 24) -> tuple[dict[str, np.ndarray], set[int]]:
    model = scenario.model
    text = next(t for t in scenario.texts[0] if len(t) >= length)[:length]
    ids = torch.tensor([text])
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    update = to_update({n: -p.grad for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return update, set(text)


def test_span_attack_names_nothing_when_the_span_is_full(scenario: Scenario) -> None:
    update, truth = _single_update(scenario)
    assert token_scores(span_attack(update, scenario.model, lora=False).tokens, truth).recall > 0.8
    rng = np.random.default_rng(0)
    for name in list(update):
        if "layers.0.self_attn" in name:
            update[name] = update[name] + 1e-3 * rng.standard_normal(update[name].shape)
    result = span_attack(update, scenario.model, lora=False)
    assert result.tokens == frozenset()
    assert "full rank" in result.detail


def test_attacks_refuse_updates_without_the_tensors_they_read(scenario: Scenario) -> None:
    update, _ = _single_update(scenario)
    no_vocab = {n: v for n, v in update.items() if "embed" not in n and "lm_head" not in n}
    with pytest.raises(AttackInputError, match="embedding or LM-head"):
        token_leakage_attack(no_vocab, scenario.vocab_size)
    no_block0 = {n: v for n, v in update.items() if "layers.0." not in n}
    with pytest.raises(AttackInputError, match="block-0"):
        span_attack(no_block0, scenario.model, lora=False)
    with pytest.raises(AttackInputError, match="LoRA A"):
        span_attack(update, scenario.model, lora=True)

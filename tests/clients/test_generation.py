"""Generation metrics: normalised exact match, ROUGE-L, and greedy answers to held-out prompts."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from clients.data import alpaca_example, prompt_ids
from clients.generation import answer_questions, exact_match, generate, rouge_l
from clients.synthetic import SyntheticFederation
from clients.trainer import LoraModel, LoraSettings


def test_exact_match_and_rouge_l() -> None:
    assert exact_match("The usual dose is 5 mg.", "usual dose is 5 mg") == 1.0
    assert exact_match("5 mg", "10 mg") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS of "police killed gunman" / "police kill gunman": police, gunman -> P = R = 2/3.
    assert rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(2 / 3)
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0
    assert rouge_l("a b c", "d e f") == 0.0


def test_batched_generation_equals_one_prompt_at_a_time(
    base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, federation: SyntheticFederation
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    vector = lm.get_vector()
    examples = [alpaca_example(r) for r in federation.test_sets["fraud"][:5]]
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    budgets = [6, 3, 6, 6, 1]
    batched = generate(lm, vector, prompts, budgets, tokenizer.pad_token_id, None, batch_size=5)
    single = [
        generate(lm, vector, [p], [b], 0, None)[0] for p, b in zip(prompts, budgets, strict=True)
    ]
    assert batched == single and [len(t) for t in batched] == budgets
    score = answer_questions(lm, vector, examples, tokenizer)
    assert len(score.answers) == 5 and 0.0 <= score.rouge_l <= 1.0
    assert score.answers[0].question == examples[0].turns[0][1] + (
        f" / {examples[0].context}" if examples[0].context else ""
    )
    assert score.answers[0].reference == examples[0].turns[1][1]

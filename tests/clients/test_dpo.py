"""The DPO objective: the loss against TRL's, the reference without a second model, the metrics."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from clients.dpo import (
    DpoConfigError,
    DpoSettings,
    PairLogps,
    dpo_loss,
    pair_logps,
    pair_outcomes,
    score_preferences,
    train_dpo,
)
from clients.preference_data import instruction_pair, tokenize_pairs
from clients.synthetic import make_preferences
from clients.trainer import LoraModel, LoraSettings, TrainSettings

# Fixed summed log-probs of 4 pairs (policy, reference) and the answers' token counts.
POLICY_CHOSEN = [-12.0, -30.5, -7.25, -18.0]
POLICY_REJECTED = [-14.0, -29.0, -9.5, -18.0]
REF_CHOSEN = [-13.0, -31.0, -7.0, -17.5]
REF_REJECTED = [-13.5, -30.0, -9.0, -18.25]
CHOSEN_TOKENS = [6, 15, 4, 9]
REJECTED_TOKENS = [7, 14, 4, 9]

#: The same figures through TRL 1.16.0's formulas (trl/trainer/dpo_trainer.py,
#: DPOTrainer._compute_loss: ``per_sequence_loss = -F.logsigmoid(self.beta * delta_score)`` for
#: "sigmoid"; for "ipo" the log-ratios divided by ``completion_mask.sum(dim=1)`` and
#: ``(ipo_delta - 1 / (2 * self.beta)) ** 2``), evaluated with Python's math module (the
#: expressions beside them), so this test runs without TRL.
PINNED = {
    # -log(1 / (1 + exp(-0.1 * ((pc - rc) - (pr - rr)))))
    ("sigmoid", 0.1): [0.620957047789532, 0.7184596480132864, 0.6807253035255248,
                       0.7313501408267952],
    # ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * 0.5)) ** 2
    ("ipo", 0.5): [0.5804988662131518, 1.0776417233560092, 0.87890625, 1.173611111111111],
}  # fmt: skip


def _tensor(values: list[float] | list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _ours(loss: str, beta: float) -> torch.Tensor:
    return dpo_loss(
        _tensor(POLICY_CHOSEN),
        _tensor(POLICY_REJECTED),
        _tensor(REF_CHOSEN),
        _tensor(REF_REJECTED),
        DpoSettings(beta, loss),  # type: ignore[arg-type]
        _tensor(CHOSEN_TOKENS),
        _tensor(REJECTED_TOKENS),
    )


@pytest.mark.parametrize(("loss", "beta"), list(PINNED))
def test_the_loss_matches_trls_formula_on_fixed_log_probs(loss: str, beta: float) -> None:
    np.testing.assert_allclose(_ours(loss, beta).numpy(), PINNED[(loss, beta)], rtol=1e-12)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def _trl_loss(loss: str, beta: float) -> torch.Tensor:
    """TRL's own DPOTrainer._compute_loss on the same figures: a model stand-in returns per-token
    log-probs that sum to POLICY_*, the reference log-probs are given precomputed (as TRL's
    ``precompute_ref_log_probs`` does), and each answer's completion mask has its token count."""
    trl = pytest.importorskip("trl")
    width = max(CHOSEN_TOKENS + REJECTED_TOKENS) + 1
    counts = CHOSEN_TOKENS + REJECTED_TOKENS
    totals = POLICY_CHOSEN + POLICY_REJECTED
    completion = torch.zeros(len(counts), width, dtype=torch.long)
    per_token = torch.zeros(len(counts), width - 1, dtype=torch.float64)
    for row, (n, total) in enumerate(zip(counts, totals, strict=True)):
        completion[row, 1 : n + 1] = 1  # position 0 is the prompt
        per_token[row, :n] = total / n  # shifted: token t+1 is predicted at t
    shape = per_token.shape

    def model(**_: Any) -> SimpleNamespace:
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(len(counts), width, dtype=torch.long),
        "attention_mask": torch.ones(len(counts), width, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": _tensor(REF_CHOSEN),
        "ref_rejected_logps": _tensor(REF_REJECTED),
    }
    loss_value: torch.Tensor = trl.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss_value


@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.5)])
def test_the_loss_equals_trls_implementation(loss: str, beta: float) -> None:
    """TRL (when installed) computes the batch mean of the same per-pair losses."""
    expected = _trl_loss(loss, beta)
    assert float(_ours(loss, beta).mean()) == pytest.approx(float(expected), rel=1e-9)


def test_settings_are_checked() -> None:
    with pytest.raises(DpoConfigError, match="beta"):
        DpoSettings(0.0)
    with pytest.raises(DpoConfigError, match="unknown DPO loss"):
        DpoSettings(0.1, "hinge")  # type: ignore[arg-type]
    with pytest.raises(DpoConfigError, match="token count"):
        dpo_loss(*(_tensor([1.0]),) * 4, DpoSettings(0.1, "ipo"))


def test_scores_count_ties_as_half_and_measure_the_margin() -> None:
    ref = PairLogps(*(np.array(v, dtype=float) for v in ([-5, -5], [-6, -6], [3, 3], [3, 3])))
    same = score_preferences(ref, ref, 0.1)
    assert same.accuracy == 0.5 and same.margin == 0.0 and same.logp_accuracy == 1.0
    moved = PairLogps(np.array([-4.0, -5.0]), np.array([-6.0, -5.0]), ref.chosen_tokens,
                      ref.rejected_tokens)  # fmt: skip
    score = score_preferences(moved, ref, 0.5)
    # pair 0: chosen +1, rejected 0 -> won; pair 1: chosen 0, rejected +1 -> lost
    assert score.accuracy == 0.5 and score.margin == pytest.approx(0.0)
    assert pair_outcomes(moved, ref).tolist() == [1.0, 0.0]  # per pair, in the pairs' order
    assert pair_outcomes(ref, ref).tolist() == [0.5, 0.5]
    assert score.chosen_reward == pytest.approx(0.25)
    assert score.rejected_reward == pytest.approx(0.25)
    better = PairLogps(np.array([-4.0, -4.0]), np.array([-6.0, -7.0]), ref.chosen_tokens,
                       ref.rejected_tokens)  # fmt: skip
    assert score_preferences(better, ref, 0.5).accuracy == 1.0
    assert score_preferences(better, ref, 0.5).margin == pytest.approx(0.5 * 1.5)


@pytest.fixture()
def pairs(tokenizer: PreTrainedTokenizerFast) -> Any:
    task = make_preferences(1, 12, 4, seed=2)
    return tokenize_pairs(task.train["cardiology-1"], tokenizer, 64, "pairs")


def test_first_step_loss_is_log2_with_the_round_start_as_reference(
    base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: Any
) -> None:
    """The reference is the same model at the global vector (no second copy): one step of
    learning rate ~0 sees policy == reference, so every pair's loss is log 2."""
    lm = LoraModel(base, LoraSettings(rank=4))
    start = lm.get_vector()
    # B = 0 at initialisation: move it so the adapter is not the bare base.
    start = start + np.random.default_rng(0).normal(0, 0.05, start.size).astype(np.float32)
    settings = TrainSettings(local_steps=1, batch_size=4, lr=1e-12, num_threads=None)
    result = train_dpo(lm, start, pairs, settings, DpoSettings(0.1), pad_id=0)
    assert result.mean_loss == pytest.approx(math.log(2), abs=1e-6)
    assert result.num_samples == len(pairs)


def test_dpo_raises_the_chosen_answers_over_the_rejected(
    base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: Any
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    start = lm.get_vector()
    before = pair_logps(lm, start, pairs, pad_id=0)
    settings = TrainSettings(local_steps=6, batch_size=4, lr=2e-2, num_threads=None)
    result = train_dpo(lm, start, pairs, settings, DpoSettings(0.5), pad_id=0)
    after = pair_logps(lm, start + result.delta, pairs, pad_id=0)
    score = score_preferences(after, before, 0.5)
    assert score.accuracy >= 0.9 and score.margin > 0
    assert result.mean_loss < math.log(2)
    # The update is over the same trainable layout as an SFT update.
    assert result.delta.shape == start.shape and result.delta.dtype == np.float32


def test_an_explicit_reference_is_used_and_checked(
    base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: Any
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    start = lm.get_vector()
    other = start + np.random.default_rng(1).normal(0, 0.05, start.size).astype(np.float32)
    settings = TrainSettings(local_steps=1, batch_size=4, lr=1e-12, num_threads=None)
    # Policy at start, reference elsewhere: the first-step loss is no longer log 2.
    result = train_dpo(lm, start, pairs, settings, DpoSettings(0.1), 0, reference=other)
    assert abs(result.mean_loss - math.log(2)) > 1e-4
    with pytest.raises(DpoConfigError, match="coordinates"):
        train_dpo(lm, start, pairs, settings, DpoSettings(0.1), 0, reference=start[:-1])


def test_pairs_with_identical_answers_after_truncation_are_dropped(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    long_prefix = "word " * 40
    pairs = [
        instruction_pair("q?", "short yes.", "short no."),
        instruction_pair("q?", long_prefix + "yes.", long_prefix + "no."),
    ]
    tokenized = tokenize_pairs(pairs, tokenizer, 24, "pairs")
    assert len(tokenized) == 1 and tokenized.dropped == 1 and tokenized.truncated == 1


def test_log_probs_do_not_depend_on_how_the_pairs_are_batched(
    base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: Any
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    start = lm.get_vector()
    whole = pair_logps(lm, start, pairs, 0, batch_size=len(pairs))
    for size in (1, 5):
        cut = pair_logps(lm, start, pairs, 0, batch_size=size)
        np.testing.assert_allclose(cut.chosen, whole.chosen, rtol=1e-5)
        np.testing.assert_allclose(cut.rejected, whole.rejected, rtol=1e-5)
    rows = np.array([3, 0, 7])
    some = pair_logps(lm, start, pairs, 0, rows=rows, batch_size=2)
    np.testing.assert_allclose(some.chosen, whole.chosen[rows], rtol=1e-5)
    assert not np.allclose(whole.chosen, whole.rejected)

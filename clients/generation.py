"""Generation metrics beside the loss: answer held-out questions, score exact match and ROUGE-L.

A loss says how likely the reference answer is; these say what the model actually writes. For
each held-out example the model is given the prompt up to its first answer (rendered as in
training, :func:`clients.data.prompt_ids`) and decodes greedily, at most the reference's length
plus a margin. Scores use the usual SQuAD-style normalisation (lower case, punctuation and
articles removed, whitespace collapsed): exact match is 1 when the normalised strings agree;
ROUGE-L is the F1 of the longest common subsequence of normalised words (Lin, 2004).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from clients.data import ChatTemplateUse, Example, prompt_ids
from clients.devices import autocast
from clients.trainer import LoraModel

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
#: Tokens generated beyond the reference's length (a model may phrase it a little longer).
MARGIN_TOKENS = 8


def normalize(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """F1 of the longest common subsequence of normalised words."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    row = [0] * (len(ref) + 1)
    for p in pred:
        previous = 0
        for j, r in enumerate(ref, start=1):
            current = row[j]
            row[j] = previous + 1 if p == r else max(row[j], row[j - 1])
            previous = current
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Answer:
    question: str
    reference: str
    answer: str

    @property
    def exact(self) -> float:
        return exact_match(self.answer, self.reference)

    @property
    def rouge(self) -> float:
        return rouge_l(self.answer, self.reference)


@dataclass(frozen=True)
class GenerationScore:
    exact_match: float
    rouge_l: float
    answers: tuple[Answer, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "exact_match": self.exact_match,
            "rouge_l": self.rouge_l,
            "samples": len(self.answers),
        }


def question_text(example: Example) -> str:
    """What a reader should see as the question: the turns before the first answer."""
    prompt, _ = example.prompt_and_answer()
    parts = [content for role, content in prompt.turns[:-1] if role != "system"]
    if example.context:
        parts.append(example.context)
    return " / ".join(parts)


@torch.no_grad()
def generate(
    lm: LoraModel,
    vector: np.ndarray,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded batches) with ``vector`` loaded."""
    lm.set_vector(vector)
    model = lm.model
    model.eval()
    out: list[list[int]] = []
    for at in range(0, len(prompts), batch_size):
        batch = prompts[at : at + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        device = lm.runtime.device
        with autocast(lm.runtime):
            generated = model.generate(  # type: ignore[no-untyped-call]
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(max_new_tokens[at : at + batch_size]),
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        for row in range(len(batch)):
            tokens = generated[row, width:].tolist()
            if eos_id is not None and eos_id in tokens:
                tokens = tokens[: tokens.index(eos_id)]
            out.append(tokens[: max_new_tokens[at + row]])
    return out


def answer_questions(
    lm: LoraModel,
    vector: np.ndarray,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: ChatTemplateUse = "auto",
) -> GenerationScore:
    """Generate each example's first answer and score it against the reference."""
    if not examples:
        return GenerationScore(float("nan"), float("nan"), ())
    prompts = [prompt_ids(e, tokenizer, chat_template) for e in examples]
    references = [e.prompt_and_answer()[1] for e in examples]
    budgets = [
        len(tokenizer.encode(r, add_special_tokens=False)) + MARGIN_TOKENS for r in references
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = generate(lm, vector, prompts, budgets, int(pad), tokenizer.eos_token_id)
    answers = tuple(
        Answer(question_text(e), ref, str(tokenizer.decode(t, skip_special_tokens=True)).strip())
        for e, ref, t in zip(examples, references, tokens, strict=True)
    )
    return GenerationScore(
        float(np.mean([a.exact for a in answers])),
        float(np.mean([a.rouge for a in answers])),
        answers,
    )

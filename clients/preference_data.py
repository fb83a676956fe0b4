"""Preference data: a prompt and two answers to it, the ``chosen`` one preferred (for DPO).

Files are read like the SFT data (:func:`clients.data.read_rows`: local ``.json``/``.jsonl``/
``.parquet``/``.csv``, every refusal naming the file and the line or record). A record is one of
(the formats of TRL's preference data sets; they may be mixed within a file):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``; the prompt is the user's
  instruction, rendered like an Alpaca record (or with the tokenizer's chat template);
* chat: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``, messages as
  ``{"role": "system"|"user"|"assistant", "content": str}``; the prompt ends with a user turn and
  each answer holds at least one assistant turn;
* chat with an implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, two whole
  conversations whose longest common run of messages is the prompt;
* ``{"prompt": str, "chosen": [messages], "rejected": [messages]}`` (UltraFeedback's layout):
  the prompt becomes a user turn, unless both conversations already start with it.

A pair is scored on its answer only: earlier assistant turns of a chat prompt are context. A
pair whose answers are equal teaches nothing and is refused; one whose answers become equal once
cut to ``max_length`` is dropped and counted, like a pair that has no answer token left.

The folder and split layouts of :mod:`clients.local_data` apply unchanged
(:func:`load_preference_data`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from clients.data import (
    ChatTemplateUse,
    Example,
    TokenizedDataset,
    Where,
    encode_example,
    read_rows,
    string_field,
    uses_chat_template,
)
from clients.errors import EmptyDatasetError
from clients.local_data import InstitutionData, load_institutions
from clients.partition import PartitionSpec

_ROLES = ("system", "user", "assistant")
Turns = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (its turns; in ``instruction`` style one user turn and an optional ``context``)
    and two answers to it (assistant turns), ``chosen`` preferred over ``rejected``."""

    prompt: Turns
    chosen: Turns
    rejected: Turns
    style: Literal["instruction", "chat"] = "instruction"  # as clients.data.Example
    context: str = ""
    origin: str = ""

    def examples(self) -> tuple[Example, Example]:
        """The chosen and the rejected conversation; only the answer's turns are trained."""
        first = len(self.prompt)

        def one(answer: Turns) -> Example:
            return Example(self.prompt + answer, self.style, self.context, self.origin, first)

        return one(self.chosen), one(self.rejected)

    def chosen_text(self) -> str:
        return "\n".join(text for _, text in self.chosen)

    def rejected_text(self) -> str:
        return "\n".join(text for _, text in self.rejected)


@dataclass(frozen=True)
class PreferenceRecord:
    pair: PreferencePair
    fields: Mapping[str, str]


def instruction_pair(
    instruction: str, chosen: str, rejected: str, context: str = "", origin: str = ""
) -> PreferencePair:
    """A pair on one instruction (and its optional input), rendered like an Alpaca record."""
    return PreferencePair(
        (("user", instruction),),
        (("assistant", chosen),),
        (("assistant", rejected),),
        "instruction",
        context,
        origin,
    )


# --- parsing ----------------------------------------------------------------------------------


def _messages(value: object, key: str, where: Where) -> Turns:
    if not isinstance(value, list) or not value:
        raise where.error(f"field {key!r} must be a non-empty list of messages")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise where.error(f"{key}[{i}] must be an object with 'role' and 'content'")
        role = string_field(message, "role", where)
        if role not in _ROLES:
            raise where.error(f"{key}[{i}] has unknown role {role!r}")
        turns.append((role, string_field(message, "content", where)))
    return tuple(turns)


def _answer(turns: Turns, key: str, where: Where) -> Turns:
    if not any(role == "assistant" for role, _ in turns):
        raise where.error(f"{key!r} has no assistant message, so there is no answer to score")
    return turns


def _chat_pair(prompt: Turns, chosen: Turns, rejected: Turns, where: Where) -> PreferencePair:
    if prompt[-1][0] != "user":
        raise where.error("the prompt must end with a user message (the turn being answered)")
    return PreferencePair(
        prompt,
        _answer(chosen, "chosen", where),
        _answer(rejected, "rejected", where),
        "chat",
        "",
        str(where),
    )


def _implicit(chosen: Turns, rejected: Turns, where: Where) -> PreferencePair:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise where.error(
            "'chosen' and 'rejected' share no first message; give the prompt in a 'prompt' field"
        )
    if shared in (len(chosen), len(rejected)):
        raise where.error("one conversation is a prefix of the other: no answer to compare")
    prompt = chosen[:shared]
    while prompt and prompt[-1][0] != "user":  # an assistant's shared opening belongs to both
        prompt = prompt[:-1]
    if not prompt:
        raise where.error("the conversations share no user message to answer")
    return _chat_pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :], where)


def parse_pair(obj: object, where: Where) -> PreferencePair:
    """One preference record of any supported format (see the module doc)."""
    if not isinstance(obj, dict):
        raise where.error("a record must be a JSON object")
    present = {k: v for k, v in obj.items() if v is not None}
    missing = [k for k in ("chosen", "rejected") if k not in present]
    if missing:
        raise where.error(
            f"missing field {missing[0]!r}: a preference record needs 'chosen' and 'rejected' "
            "(and a 'prompt', unless both are whole conversations)"
        )
    chosen, rejected, prompt = present["chosen"], present["rejected"], present.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise where.error("'chosen' and 'rejected' must both be strings or both message lists")
        if not isinstance(prompt, str):
            raise where.error(
                "string answers need a string 'prompt'"
                if prompt is None
                else "string answers need a string 'prompt', not a message list"
            )
        if chosen == rejected:
            raise where.error("'chosen' and 'rejected' are the same answer: nothing to prefer")
        return instruction_pair(prompt, chosen, rejected, origin=str(where))
    chosen_turns = _messages(chosen, "chosen", where)
    rejected_turns = _messages(rejected, "rejected", where)
    if chosen_turns == rejected_turns:
        raise where.error("'chosen' and 'rejected' are the same conversation: nothing to prefer")
    if prompt is None:
        return _implicit(chosen_turns, rejected_turns, where)
    if isinstance(prompt, str):
        user = ("user", prompt)
        if chosen_turns[0] == user and rejected_turns[0] == user:
            return _implicit(chosen_turns, rejected_turns, where)
        return _chat_pair((user,), chosen_turns, rejected_turns, where)
    return _chat_pair(_messages(prompt, "prompt", where), chosen_turns, rejected_turns, where)


def _scalars(obj: object) -> dict[str, str]:
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(v, str) and k not in ("chosen", "rejected")}


def load_pairs(path: str | Path) -> list[PreferenceRecord]:
    """Every preference record of a local data file, parsed."""
    return [
        PreferenceRecord(parse_pair(row, where), _scalars(row)) for where, row in read_rows(path)
    ]


def _read(path: Path) -> list[tuple[PreferencePair, Mapping[str, str]]]:
    return [(r.pair, r.fields) for r in load_pairs(path)]


def load_preference_data(
    path: Path, split: PartitionSpec | None = None
) -> InstitutionData[PreferencePair]:
    """Institutions' preference pairs and their own held-out pairs, from a folder of files (one
    per institution, optional ``test/``) or one file split by ``split`` (as the SFT data)."""
    return load_institutions(path, split, _read, "--preference-data")


# --- tokenising -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPairs:
    """Row i of ``chosen`` and of ``rejected`` are the two answers of ``pairs[i]``.
    ``truncated`` counts pairs of which either side was cut, ``dropped`` pairs left with no
    answer token or with equal answers after the cut (not kept)."""

    chosen: TokenizedDataset
    rejected: TokenizedDataset
    pairs: tuple[PreferencePair, ...]
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, rows: Sequence[int]) -> TokenizedPairs:
        return TokenizedPairs(
            self.chosen.subset(rows),
            self.rejected.subset(rows),
            tuple(self.pairs[i] for i in rows),
        )


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    name: str,
    chat_template: ChatTemplateUse = "auto",
) -> TokenizedPairs:
    """Both answers of every pair, rendered as the SFT data is (:func:`clients.data.tokenize`)."""
    templated = uses_chat_template(tokenizer, chat_template)
    chosen_ids: list[np.ndarray] = []
    chosen_labels: list[np.ndarray] = []
    rejected_ids: list[np.ndarray] = []
    rejected_labels: list[np.ndarray] = []
    kept: list[PreferencePair] = []
    kept_examples: list[tuple[Example, Example]] = []
    truncated = dropped = 0
    for pair in pairs:
        good, bad = pair.examples()
        a = encode_example(good, tokenizer, max_length, name, templated)
        b = encode_example(bad, tokenizer, max_length, name, templated)
        truncated += a.truncated or b.truncated
        if a.labels is None or b.labels is None or _same(a.ids, a.labels, b.ids, b.labels):
            dropped += 1
            continue
        chosen_ids.append(a.ids)
        chosen_labels.append(a.labels)
        rejected_ids.append(b.ids)
        rejected_labels.append(b.labels)
        kept.append(pair)
        kept_examples.append((good, bad))
    if not kept:
        raise EmptyDatasetError(
            f"{name}: no preference pair has differing answer tokens within max_length={max_length}"
        )
    return TokenizedPairs(
        TokenizedDataset(
            tuple(chosen_ids), tuple(chosen_labels), 0, 0, tuple(e[0] for e in kept_examples)
        ),
        TokenizedDataset(
            tuple(rejected_ids), tuple(rejected_labels), 0, 0, tuple(e[1] for e in kept_examples)
        ),
        tuple(kept),
        truncated,
        dropped,
    )


def _same(ids_a: np.ndarray, labels_a: Any, ids_b: np.ndarray, labels_b: Any) -> bool:
    return bool(np.array_equal(ids_a, ids_b) and np.array_equal(labels_a, labels_b))

"""Local instruction data: read JSONL, render prompts, tokenise with the loss on responses only.

Two record formats, one per line of a ``.jsonl`` file:

* Alpaca: ``{"instruction": str, "input": str (may be empty or absent), "output": str}``
* chat:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``

An example is a sequence of text segments, each marked trainable or not; labels are ``-100``
(ignored by the loss) everywhere except on trainable segments, i.e. the responses. Every
refusal names the file and the 1-based line so the operator can fix the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from clients.errors import DataFormatError, EmptyDatasetError

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class AlpacaRecord:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Example:
    """Text segments in order; ``trainable`` segments are the ones the loss is computed on."""

    segments: tuple[tuple[str, bool], ...]


def alpaca_prompt(instruction: str, context: str) -> str:
    if context:
        return f"### Instruction:\n{instruction}\n### Input:\n{context}\n### Response:\n"
    return f"### Instruction:\n{instruction}\n### Response:\n"


def alpaca_example(record: AlpacaRecord) -> Example:
    return Example(
        ((alpaca_prompt(record.instruction, record.input), False), (record.output, True))
    )


def chat_example(messages: Sequence[tuple[str, str]]) -> Example:
    """Render (role, content) turns; only assistant turns are trained on."""
    segments: list[tuple[str, bool]] = []
    for role, content in messages:
        segments.append((f"<|{role}|>\n", False))
        segments.append((content + "\n", role == "assistant"))
    return Example(tuple(segments))


def _field(obj: dict[str, object], key: str, path: Path, line: int, optional: bool = False) -> str:
    if key not in obj:
        if optional:
            return ""
        raise DataFormatError(path, line, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(
            path, line, f"field {key!r} must be a string, not {type(value).__name__}"
        )
    return value


def _parse_chat(messages: object, path: Path, line: int) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(path, line, "field 'messages' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataFormatError(path, line, f"messages[{i}] must be an object")
        role = _field(message, "role", path, line)
        if role not in _ROLES:
            raise DataFormatError(path, line, f"messages[{i}] has unknown role {role!r}")
        turns.append((role, _field(message, "content", path, line)))
    if not any(role == "assistant" for role, _ in turns):
        raise DataFormatError(path, line, "no assistant message, so nothing to train on")
    return chat_example(turns)


def parse_record(obj: object, path: Path, line: int) -> Example:
    if not isinstance(obj, dict):
        raise DataFormatError(path, line, "a record must be a JSON object")
    if "messages" in obj:
        return _parse_chat(obj["messages"], path, line)
    if "instruction" not in obj and "output" not in obj:
        raise DataFormatError(
            path, line, "record has neither 'messages' (chat) nor 'instruction'/'output' (Alpaca)"
        )
    record = AlpacaRecord(
        instruction=_field(obj, "instruction", path, line),
        input=_field(obj, "input", path, line, optional=True),
        output=_field(obj, "output", path, line),
    )
    return alpaca_example(record)


def load_jsonl(path: str | Path) -> list[Example]:
    """Read Alpaca or chat JSONL (formats may be mixed per line; blank lines are skipped)."""
    file = Path(path)
    if not file.is_file():
        raise EmptyDatasetError(f"{file}: data file does not exist")
    examples: list[Example] = []
    with file.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataFormatError(file, number, f"malformed JSON: {exc.msg}") from exc
            examples.append(parse_record(obj, file, number))
    if not examples:
        raise EmptyDatasetError(f"{file}: no records")
    return examples


def write_alpaca_jsonl(records: Iterable[AlpacaRecord], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for r in records:
            handle.write(
                json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output})
            )
            handle.write("\n")


@dataclass(frozen=True)
class TokenizedDataset:
    """Ragged token sequences; ``truncated`` counts examples cut at ``max_length``."""

    input_ids: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, name: str
) -> TokenizedDataset:
    """Token ids and labels; segments are encoded separately so the label boundary is exact.

    An example whose trainable tokens are all cut off by ``max_length`` carries no signal and is
    dropped; if nothing is left the data set is refused (``name`` says which one).
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    ids_out: list[np.ndarray] = []
    labels_out: list[np.ndarray] = []
    truncated = 0
    for example in examples:
        ids: list[int] = list(bos)
        labels: list[int] = [IGNORE_INDEX] * len(bos)
        for text, trainable in example.segments:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if trainable else [IGNORE_INDEX] * len(piece)
        if eos is not None:
            # The model must learn where a response stops.
            ids.append(eos)
            labels.append(eos)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            continue
        ids_out.append(np.asarray(ids, dtype=np.int64))
        labels_out.append(np.asarray(labels, dtype=np.int64))
    if not ids_out:
        raise EmptyDatasetError(
            f"{name}: no example has response tokens within max_length={max_length}"
        )
    return TokenizedDataset(tuple(ids_out), tuple(labels_out), truncated)

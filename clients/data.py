"""Local instruction and chat data: read it, render it, tokenise it with the loss on responses.

Files (:func:`load_records`) are read with Hugging Face ``datasets`` from local ``.json`` (one
JSON array or JSON Lines), ``.jsonl``, ``.parquet`` or ``.csv``; nothing is downloaded. Each
record is one of (formats may be mixed within a file):

* Alpaca: ``{"instruction", "input" (optional), "output"}``
* Dolly: ``{"instruction", "context" (optional), "response", "category" (optional)}``
* prompt/completion: ``{"prompt", "completion"}`` (raw text, no chat rendering)
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}``

Every refusal names the file and the 1-based line (JSON Lines, CSV) or record (JSON array,
Parquet) so the operator can fix it. An example's loss is taken on the assistant's tokens only.

Rendering (:func:`tokenize`): when the tokenizer has a chat template (an instruct model's), every
record except prompt/completion is rendered with it, the assistant turns marked trainable by
rendering the conversation turn by turn; without one (the embedded tokenizer), instruction
records use the Alpaca prompt and chat records a plain ``<|role|>`` layout. Examples longer than
``max_length`` are cut and counted; one whose response is cut away entirely is dropped and
counted too.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from clients.errors import ChatTemplateError, DataFormatError, EmptyDatasetError

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}  # fmt: skip
#: File suffix -> ``datasets`` builder.
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
Style = Literal["instruction", "chat", "completion"]
ChatTemplateUse = Literal["auto", "off"]


@dataclass(frozen=True)
class AlpacaRecord:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Example:
    """One training conversation: (role, content) turns, at least one by the assistant.

    ``style`` says how it renders without a chat template: ``instruction`` (Alpaca prompt, the
    first turn is the instruction and ``context`` the optional input), ``completion`` (the
    prompt and the completion as raw text) or ``chat``. ``origin`` is "file:line" for errors.
    """

    turns: tuple[tuple[str, str], ...]
    style: Style = "chat"
    context: str = ""
    origin: str = ""

    @property
    def segments(self) -> tuple[tuple[str, bool], ...]:
        """Plain rendering (no chat template): text pieces, each marked trainable or not."""
        if self.style == "instruction":
            (_, instruction), (_, output) = self.turns
            return ((alpaca_prompt(instruction, self.context), False), (output, True))
        if self.style == "completion":
            (_, prompt), (_, completion) = self.turns
            return ((prompt, False), (completion, True))
        out: list[tuple[str, bool]] = []
        for role, content in self.turns:
            out.append((f"<|{role}|>\n", False))
            out.append((content + "\n", role == "assistant"))
        return tuple(out)

    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat-template messages (the context joins the instruction)."""
        turns = list(self.turns)
        if self.style == "instruction" and self.context:
            role, instruction = turns[0]
            turns[0] = (role, f"{instruction}\n\n{self.context}")
        return [{"role": role, "content": content} for role, content in turns]

    def prompt_and_answer(self) -> tuple[Example, str]:
        """This example cut before its first assistant turn, and that turn's text (what
        generation metrics compare a model's answer with)."""
        first = next(i for i, (role, _) in enumerate(self.turns) if role == "assistant")
        return Example(self.turns[: first + 1], self.style, self.context, self.origin), self.turns[
            first
        ][1]


def alpaca_prompt(instruction: str, context: str) -> str:
    if context:
        return f"### Instruction:\n{instruction}\n### Input:\n{context}\n### Response:\n"
    return f"### Instruction:\n{instruction}\n### Response:\n"


def alpaca_example(record: AlpacaRecord, origin: str = "") -> Example:
    return Example(
        (("user", record.instruction), ("assistant", record.output)),
        "instruction",
        record.input,
        origin,
    )


def chat_example(messages: Sequence[tuple[str, str]], origin: str = "") -> Example:
    """(role, content) turns; only assistant turns are trained on."""
    return Example(tuple(messages), "chat", "", origin)


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A parsed example and the record's scalar string fields (for partitioning by a field)."""

    example: Example
    fields: Mapping[str, str] = field(default_factory=dict)


class _Where:
    def __init__(self, path: Path, number: int, unit: str) -> None:
        self.path, self.number, self.unit = path, number, unit

    def error(self, problem: str) -> DataFormatError:
        return DataFormatError(self.path, self.number, problem, self.unit)

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.number}"
            if self.unit == "line"
            else (f"{self.path} record {self.number}")
        )


def _string(obj: Mapping[str, Any], key: str, where: _Where, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if optional:
            return ""
        raise where.error(f"missing field {key!r}")
    if not isinstance(value, str):
        raise where.error(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


def _turns(
    items: object, key: str, role_key: str, text_key: str, roles: Mapping[str, str], where: _Where
) -> Example:
    if not isinstance(items, list) or not items:
        raise where.error(f"field {key!r} must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(items):
        if not isinstance(message, dict):
            raise where.error(f"{key}[{i}] must be an object")
        role = _string(message, role_key, where)
        if role not in roles:
            raise where.error(f"{key}[{i}] has unknown role {role!r}")
        turns.append((roles[role], _string(message, text_key, where)))
    if not any(role == "assistant" for role, _ in turns):
        raise where.error("no assistant message, so nothing to train on")
    return chat_example(turns, str(where))


def _parse(obj: object, where: _Where) -> Example:
    if not isinstance(obj, dict):
        raise where.error("a record must be a JSON object")
    present = {k: v for k, v in obj.items() if v is not None}
    if "messages" in present:
        return _turns(present["messages"], "messages", "role", "content",
                      {r: r for r in _ROLES}, where)  # fmt: skip
    if "conversations" in present:
        return _turns(present["conversations"], "conversations", "from", "value",
                      _SHAREGPT_ROLES, where)  # fmt: skip
    if "prompt" in present or "completion" in present:
        turns = (("user", _string(present, "prompt", where)),
                 ("assistant", _string(present, "completion", where)))  # fmt: skip
        return Example(turns, "completion", "", str(where))
    if "response" in present:  # Dolly
        record = AlpacaRecord(
            _string(present, "instruction", where),
            _string(present, "context", where, optional=True),
            _string(present, "response", where),
        )
        return alpaca_example(record, str(where))
    if "instruction" in present or "output" in present:
        record = AlpacaRecord(
            _string(present, "instruction", where),
            _string(present, "input", where, optional=True),
            _string(present, "output", where),
        )
        return alpaca_example(record, str(where))
    raise where.error(
        "unknown record format: need 'messages', 'conversations' (ShareGPT), "
        "'instruction'/'output' (Alpaca), 'instruction'/'response' (Dolly) or "
        "'prompt'/'completion'"
    )


def parse_record(obj: object, path: Path, line: int) -> Example:
    """One record of any supported format (``line`` is 1-based)."""
    return _parse(obj, _Where(path, line, "line"))


def _scalars(obj: Mapping[str, Any]) -> dict[str, str]:
    return {k: v for k, v in obj.items() if isinstance(v, str)}


def _scan_json_lines(file: Path) -> list[tuple[int, object]]:
    """(line number, object) of every non-blank line, or the first line that is not JSON."""
    rows: list[tuple[int, object]] = []
    with file.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                rows.append((number, json.loads(text)))
            except json.JSONDecodeError as exc:
                raise DataFormatError(file, number, f"malformed JSON: {exc.msg}") from exc
    return rows


def _is_json_array(file: Path) -> bool:
    with file.open(encoding="utf-8") as handle:
        for text in handle:
            if text.strip():
                return text.lstrip().startswith("[")
    return False


def _load_with_datasets(file: Path, builder: str) -> list[dict[str, Any]]:
    import datasets  # imported here: a second or two, and only when files are read

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    extra: dict[str, Any] = {"keep_default_na": False} if builder == "csv" else {}
    # A private cache, removed afterwards: local files need no shared Arrow cache.
    with tempfile.TemporaryDirectory(prefix="fedsec-data-") as cache:
        loaded = datasets.load_dataset(
            builder,
            data_files=str(file),
            split="train",
            cache_dir=cache,
            keep_in_memory=True,
            **extra,
        )
        rows: list[dict[str, Any]] = loaded.to_list()
    return rows


def load_records(path: str | Path) -> list[Record]:
    """Every record of a local data file, parsed (see the module doc for the formats)."""
    file = Path(path)
    if not file.is_file():
        raise EmptyDatasetError(f"{file}: data file does not exist")
    builder = FORMATS.get(file.suffix.lower())
    if builder is None:
        raise EmptyDatasetError(
            f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(FORMATS)}"
        )
    json_lines = builder == "json" and not _is_json_array(file)
    numbers: list[int] | None = None
    if json_lines:
        # Our own scan names the exact line of malformed JSON (datasets reports a byte block),
        # and maps the n-th record to its line (blank lines are skipped by both).
        numbers = [number for number, _ in _scan_json_lines(file)]
    if file.stat().st_size == 0 or numbers == []:
        raise EmptyDatasetError(f"{file}: no records")
    rows: list[Any]
    try:
        rows = _load_with_datasets(file, builder)
    except Exception as exc:  # datasets/pyarrow raise many types; re-checked below
        if not json_lines:
            raise EmptyDatasetError(f"{file}: cannot be read as {builder}: {exc}") from exc
        # Rows pyarrow cannot put in one table (e.g. a list where others have a string): check
        # them one by one, so the refusal names the offending line.
        rows = [obj for _, obj in _scan_json_lines(file)]
    if not rows:
        raise EmptyDatasetError(f"{file}: no records")
    records: list[Record] = []
    for index, row in enumerate(rows):
        if numbers is not None:
            where = _Where(file, numbers[index], "line")
        elif builder == "csv":
            where = _Where(file, index + 2, "line")  # line 1 is the header
            row = {k: v if v is None or isinstance(v, str) else str(v) for k, v in row.items()}
        else:
            where = _Where(file, index + 1, "record")
        records.append(Record(_parse(row, where), _scalars(row) if isinstance(row, dict) else {}))
    return records


def load_jsonl(path: str | Path) -> list[Example]:
    """The examples of one data file (any supported format; the name is historical)."""
    return [r.example for r in load_records(path)]


def write_alpaca_jsonl(records: Iterable[AlpacaRecord], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for r in records:
            handle.write(
                json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output})
            )
            handle.write("\n")


# --- tokenising -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedDataset:
    """Ragged token sequences. ``truncated`` counts examples longer than ``max_length`` (cut),
    ``dropped`` those of them whose response was cut away entirely (not kept); ``examples``
    holds the source examples of the kept rows, in order (for generation)."""

    input_ids: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    truncated: int
    dropped: int = 0
    examples: tuple[Example, ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: Sequence[int]) -> TokenizedDataset:
        return TokenizedDataset(
            tuple(self.input_ids[i] for i in rows),
            tuple(self.labels[i] for i in rows),
            0,
            0,
            tuple(self.examples[i] for i in rows) if self.examples else (),
        )


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, use: ChatTemplateUse = "auto") -> bool:
    return use == "auto" and bool(getattr(tokenizer, "chat_template", None))


def _template_segments(
    example: Example, tokenizer: PreTrainedTokenizerBase, name: str
) -> list[tuple[str, bool]]:
    """Render turn by turn: the text the template adds with each assistant turn is trainable.

    Needs the template to render a conversation's prefixes as prefixes of the whole (true of
    ChatML, Llama and Mistral templates); one that rewrites earlier turns is refused.
    """
    messages = example.messages()

    def render(upto: int, prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=prompt
            )
        except Exception as exc:  # jinja raises its own types for bad turns
            raise ChatTemplateError(f"{example.origin or name}: chat template: {exc}") from exc
        return str(text)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(example.turns):
        if role != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ChatTemplateError(
                f"{example.origin or name}: the tokenizer's chat template does not render this "
                "conversation turn by turn (it rewrites earlier turns); use chat_template = off",
            )
        segments += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    return segments


def tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    name: str,
    chat_template: ChatTemplateUse = "auto",
) -> TokenizedDataset:
    """Token ids and labels; segments are encoded separately so the label boundary is exact.

    An example whose trainable tokens are all cut off by ``max_length`` carries no signal and is
    dropped; if nothing is left the data set is refused (``name`` says which one).
    """
    templated = uses_chat_template(tokenizer, chat_template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    ids_out: list[np.ndarray] = []
    labels_out: list[np.ndarray] = []
    kept: list[Example] = []
    truncated = dropped = 0
    for example in examples:
        use_template = templated and example.style != "completion"
        segments = (
            _template_segments(example, tokenizer, name) if use_template else example.segments
        )
        # A template writes its own begin/end markers; plain text gets BOS and EOS here.
        ids: list[int] = [] if use_template else list(bos)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        for text, trainable in segments:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if trainable else [IGNORE_INDEX] * len(piece)
        if eos is not None and not use_template:
            # The model must learn where a response stops.
            ids.append(eos)
            labels.append(eos)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        ids_out.append(np.asarray(ids, dtype=np.int64))
        labels_out.append(np.asarray(labels, dtype=np.int64))
        kept.append(example)
    if not ids_out:
        raise EmptyDatasetError(
            f"{name}: no example has response tokens within max_length={max_length}"
        )
    return TokenizedDataset(tuple(ids_out), tuple(labels_out), truncated, dropped, tuple(kept))


def prompt_ids(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    chat_template: ChatTemplateUse = "auto",
) -> list[int]:
    """The tokens a model is given to generate ``example``'s first answer from."""
    prompt, _ = example.prompt_and_answer()
    if uses_chat_template(tokenizer, chat_template) and example.style != "completion":
        messages = prompt.messages()[:-1]
        text = str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    text = "".join(piece for piece, _ in prompt.segments[:-1])  # all but the answer
    return bos + list(tokenizer.encode(text, add_special_tokens=False))

"""Instruction data: loss on responses only, and errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from clients.data import (
    IGNORE_INDEX,
    AlpacaRecord,
    load_jsonl,
    tokenize,
    write_alpaca_jsonl,
)
from clients.errors import DataFormatError, EmptyDatasetError


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_alpaca_labels_cover_exactly_the_response(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    path = tmp_path / "a.jsonl"
    write_alpaca_jsonl([AlpacaRecord("Dose of digoxin?", "ECG normal.", "It is 5 mg daily.")], path)
    data = tokenize(load_jsonl(path), tokenizer, 256, "a")
    ids, labels = data.input_ids[0], data.labels[0]
    trained = ids[labels != IGNORE_INDEX]
    assert tokenizer.decode(trained[:-1]) == "It is 5 mg daily."
    assert trained[-1] == tokenizer.eos_token_id
    assert "Dose of digoxin?" in tokenizer.decode(ids[labels == IGNORE_INDEX])


def test_chat_trains_on_assistant_turns_only(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    messages = [
        {"role": "system", "content": "You are a bank."},
        {"role": "user", "content": "Rate?"},
        {"role": "assistant", "content": "Three percent."},
        {"role": "user", "content": "Fees?"},
        {"role": "assistant", "content": "None."},
    ]
    path = _write(tmp_path / "c.jsonl", [json.dumps({"messages": messages}), ""])
    data = tokenize(load_jsonl(path), tokenizer, 256, "c")
    trained = tokenizer.decode(data.input_ids[0][data.labels[0] != IGNORE_INDEX])
    assert "Three percent." in trained and "None." in trained
    assert "Rate?" not in trained and "bank" not in trained


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "x", "output": ', "malformed JSON"),
        ('{"instruction": "x"}', "missing field 'output'"),
        ('{"instruction": "x", "output": 3}', "'output' must be a string"),
        ("[1, 2]", "must be a JSON object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
        ('{"text": "free text"}', "neither 'messages'"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = _write(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataFormatError, match=message) as info:
        load_jsonl(path)
    assert info.value.line == 3 and str(info.value).startswith(f"{path}:3: ")


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError, match="no records"):
        load_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_truncation_is_counted_and_fully_truncated_sets_refused(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    path = tmp_path / "t.jsonl"
    write_alpaca_jsonl([AlpacaRecord("q " * 50, "", "short"), AlpacaRecord("q", "", "ok")], path)
    examples = load_jsonl(path)
    data = tokenize(examples, tokenizer, 30, "t")
    assert len(data) == 1 and data.truncated == 1
    assert np.all(data.input_ids[0] == tokenize(examples[1:], tokenizer, 30, "t").input_ids[0])
    with pytest.raises(EmptyDatasetError, match="t: no example"):
        tokenize(examples[:1], tokenizer, 30, "t")

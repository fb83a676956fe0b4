"""Instruction data: loss on responses only, and errors that name the file and line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from clients.data import (
    IGNORE_INDEX,
    AlpacaRecord,
    alpaca_example,
    chat_example,
    load_jsonl,
    load_records,
    prompt_ids,
    tokenize,
    write_alpaca_jsonl,
)
from clients.errors import ChatTemplateError, DataFormatError, EmptyDatasetError


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
        ('{"text": "free text"}', "unknown record format: need 'messages'"),
        ('{"conversations": [{"from": "human", "value": "hi"}]}', "no assistant message"),
        ('{"conversations": [{"from": "bot", "value": "hi"}]}', "unknown role 'bot'"),
        ('{"instruction": "x", "response": ["a"]}', "'response' must be a string, not list"),
        ('{"prompt": "x"}', "missing field 'completion'"),
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
    assert len(data) == 1 and data.truncated == 1 and data.dropped == 1
    assert np.all(data.input_ids[0] == tokenize(examples[1:], tokenizer, 30, "t").input_ids[0])
    with pytest.raises(EmptyDatasetError, match="t: no example"):
        tokenize(examples[:1], tokenizer, 30, "t")


CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_every_record_format_parses_to_the_same_conversation(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Rate?", "input": "Saver", "output": "Two."},
        {"instruction": "Rate?", "context": "Saver", "response": "Two.", "category": "qa"},
        {"messages": [{"role": "user", "content": "Rate?"},
                      {"role": "assistant", "content": "Two."}]},
        {"conversations": [{"from": "human", "value": "Rate?"}, {"from": "gpt", "value": "Two."}]},
        {"prompt": "Rate? ", "completion": "Two."},
    ]  # fmt: skip
    path = _write(tmp_path / "mixed.jsonl", [json.dumps(r) for r in rows])
    records = load_records(path)
    alpaca, dolly, chat, sharegpt, completion = (r.example for r in records)
    assert alpaca.turns == dolly.turns and alpaca.context == dolly.context == "Saver"
    assert alpaca.style == dolly.style == "instruction"
    assert chat.turns == sharegpt.turns == (("user", "Rate?"), ("assistant", "Two."))
    assert completion.style == "completion" and completion.text() == "Rate? Two."
    assert records[1].fields["category"] == "qa"
    assert alpaca.origin == f"{path}:1" and completion.origin == f"{path}:5"


def test_json_array_parquet_and_csv_files(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text("instruction,input,output\nq0,,a0\nq1,ctx,7\nq2,,a2\n")
    for name in ("a.json", "a.parquet", "a.csv"):
        examples = load_jsonl(tmp_path / name)
        assert [e.turns[1][1] for e in examples] == ["a0", "7" if name == "a.csv" else "a1", "a2"]
    assert load_jsonl(tmp_path / "a.csv")[1].context == "ctx"
    (tmp_path / "b.csv").write_text("question,answer\nq0,a0\n")
    with pytest.raises(DataFormatError, match="unknown record format") as info:
        load_jsonl(tmp_path / "b.csv")
    assert str(info.value).startswith(f"{tmp_path / 'b.csv'}:2: ")  # header is line 1
    (tmp_path / "b.json").write_text(json.dumps([rows[0], {"instruction": "q"}]))
    with pytest.raises(DataFormatError, match=r"b\.json: record 2: missing field 'output'"):
        load_jsonl(tmp_path / "b.json")
    with pytest.raises(EmptyDatasetError, match=r"unsupported file type '\.txt'"):
        load_jsonl(_write(tmp_path / "c.txt", ["hello"]))


def test_a_chat_template_renders_every_format_and_marks_the_answers(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = CHATML
    turns = (("system", "Be brief."), ("user", "Rate?"), ("assistant", "Two."),
             ("user", "Fee?"), ("assistant", "None."))  # fmt: skip
    data = tokenize([chat_example(turns)], templated, 256, "chat")
    ids, labels = data.input_ids[0], data.labels[0]
    full = templated.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False
    )
    assert templated.decode(ids) == full  # no extra BOS/EOS around the template's own markers
    trained = templated.decode(ids[labels != IGNORE_INDEX])
    assert trained == "Two.</s>\nNone.</s>\n"
    alpaca = tokenize([alpaca_example(AlpacaRecord("Rate?", "Saver", "Two."))], templated, 256, "a")
    assert templated.decode(alpaca.input_ids[0]).startswith("<s>user\nRate?\n\nSaver</s>")
    prompt = prompt_ids(alpaca.examples[0], templated)
    assert templated.decode(prompt) == "<s>user\nRate?\n\nSaver</s>\n<s>assistant\n"
    plain = tokenize([alpaca_example(AlpacaRecord("Rate?", "", "Two."))], tokenizer, 256, "p")
    assert "### Instruction" in tokenizer.decode(plain.input_ids[0])
    assert tokenize([chat_example(turns)], templated, 256, "x", "off").input_ids[0].tolist() == (
        tokenize([chat_example(turns)], tokenizer, 256, "x").input_ids[0].tolist()
    )


def test_a_template_that_rewrites_earlier_turns_is_refused(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    turns = (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    with pytest.raises(ChatTemplateError, match="does not render this conversation turn by turn"):
        tokenize([chat_example(turns, "f.jsonl:4")], templated, 256, "x")

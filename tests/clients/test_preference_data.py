"""Preference data: the record formats, one-line refusals naming file and line, the layouts,
tokenising both answers, and the embedded preference task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from clients.data import IGNORE_INDEX, tokenize
from clients.errors import DataFormatError, EmptyDatasetError
from clients.local_data import DataLayoutError
from clients.partition import PartitionSpec
from clients.preference_data import (
    PreferencePair,
    load_pairs,
    load_preference_data,
    tokenize_pairs,
)
from clients.synthetic import (
    DOMAINS,
    SyntheticConfigError,
    make_federation,
    make_preferences,
)


def _write(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


USER = {"role": "user", "content": "How do I reset it?"}
GOOD = {"role": "assistant", "content": "Hold the button for ten seconds."}
BAD = {"role": "assistant", "content": "Throw it away."}


def test_every_record_format_parses(tmp_path: Path) -> None:
    file = _write(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "site": "a"},
            {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
            {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
            {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD]},
            {"prompt": USER["content"], "chosen": [GOOD], "rejected": [BAD]},
        ],
    )
    records = load_pairs(file)
    standard = records[0].pair
    assert standard.style == "instruction" and standard.prompt == (("user", "Name a colour."),)
    assert standard.chosen_text() == "Blue." and standard.rejected_text() == "Seven."
    assert records[0].fields == {"prompt": "Name a colour.", "site": "a"}
    chat = [r.pair for r in records[1:]]
    for pair in chat:
        assert pair.style == "chat" and pair.prompt == (("user", USER["content"]),)
        assert pair.chosen == (("assistant", GOOD["content"]),)
        assert pair.rejected == (("assistant", BAD["content"]),)
    assert records[2].pair.origin == f"{file}:3"


def test_a_multi_turn_prompt_keeps_its_earlier_answers_as_context(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    history = (("user", "Hi"), ("assistant", "Hello, how can I help?"), ("user", "Reset it?"))
    pair = PreferencePair(
        history, (("assistant", "Hold it."),), (("assistant", "Bin it."),), "chat"
    )
    chosen, _ = pair.examples()
    trained = tokenize([chosen], tokenizer, 256, "t")
    labels = trained.labels[0]
    answer = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "Hold it." in answer and "Hello" not in answer


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "are the same answer"),
        ({"chosen": "a", "rejected": "b"}, "string answers need a string 'prompt'"),
        ({"prompt": [USER], "chosen": "a", "rejected": "b"}, "not a message list"),
        ({"prompt": "p", "chosen": "a", "rejected": [BAD]}, "both be strings or both message"),
        ({"prompt": [USER], "chosen": [USER], "rejected": [BAD]}, "'chosen' has no assistant"),
        ({"prompt": [GOOD], "chosen": [GOOD], "rejected": [BAD]}, "must end with a user message"),
        ({"chosen": [GOOD], "rejected": [BAD]}, "share no first message"),
        ({"chosen": [USER, GOOD], "rejected": [USER]}, "a prefix of the other"),
        ({"prompt": [USER], "chosen": [{"role": "bot", "content": "x"}], "rejected": [BAD]},
         "chosen[0] has unknown role 'bot'"),
        ({"prompt": [USER], "chosen": [], "rejected": [BAD]}, "non-empty list of messages"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]}, "the same conversation"),
        ([1, 2], "a record must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_records_are_refused_naming_the_file_and_line(
    tmp_path: Path, record: object, message: str
) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    file = _write(tmp_path / "pairs.jsonl", [good, record])
    with pytest.raises(DataFormatError) as info:
        load_pairs(file)
    assert str(info.value).startswith(f"{file}:2: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_other_file_types_and_record_numbers(tmp_path: Path) -> None:
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"x": 1}]))
    with pytest.raises(DataFormatError, match=r"pairs.json: record 2: missing field 'chosen'"):
        load_pairs(array)
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\np,a,b\nq,c,c\n")
    with pytest.raises(DataFormatError, match=r"pairs.csv:3: .*the same answer"):
        load_pairs(csv)


def test_a_folder_or_a_split_file_gives_institutions(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "b"):
        rows = [{"prompt": f"{name}{i}", "chosen": "x", "rejected": "y"} for i in range(10)]
        _write(folder / f"{name}.jsonl", rows)
    data = load_preference_data(folder)
    assert sorted(data.train) == ["a", "b"] and [len(v) for v in data.test.values()] == [1, 1]
    one = _write(
        tmp_path / "all.jsonl",
        [{"prompt": f"q{i}", "chosen": "x", "rejected": "y", "site": f"s{i % 3}"}
         for i in range(30)],
    )  # fmt: skip
    split = load_preference_data(one, PartitionSpec("field", field="site"))
    assert sorted(split.train) == ["s0", "s1", "s2"]
    assert sum(len(v) for v in split.train.values()) + 3 == 30
    with pytest.raises(DataLayoutError, match=r"--preference-data .* is one file"):
        load_preference_data(one)


def test_both_answers_are_tokenised_like_sft_examples(tokenizer: PreTrainedTokenizerFast) -> None:
    task = make_preferences(1, 6, 2, seed=0)
    pairs = task.train["cardiology-1"]
    tokenized = tokenize_pairs(pairs, tokenizer, 128, "pairs")
    assert len(tokenized) == 6 and tokenized.pairs == pairs
    # The chosen side is exactly the SFT rendering of the same record.
    sft = tokenize([pairs[0].examples()[0]], tokenizer, 128, "sft")
    np.testing.assert_array_equal(tokenized.chosen.input_ids[0], sft.input_ids[0])
    np.testing.assert_array_equal(tokenized.chosen.labels[0], sft.labels[0])
    assert not np.array_equal(tokenized.chosen.input_ids[0], tokenized.rejected.input_ids[0])
    with pytest.raises(EmptyDatasetError, match="no preference pair"):
        tokenize_pairs(pairs, tokenizer, 4, "pairs")


def test_the_embedded_task_is_seeded_specialised_and_held_out() -> None:
    task = make_preferences(4, 40, 20, seed=3)
    assert task == make_preferences(4, 40, 20, seed=3)
    assert task.train != make_preferences(4, 40, 20, seed=4).train
    names = [i.name for i in make_federation(4, 8, seed=3).institutions]
    assert list(task.train) == list(task.test) == names
    for i, name in enumerate(names):
        pairs = task.train[name]
        assert len(pairs) == 40 and len(task.test[name]) == 20
        assert set(task.train_kinds[name]) == {"rule", "fact"}
        # Chosen and rejected differ in one phrase, after a shared beginning.
        for pair in pairs:
            chosen, rejected = pair.chosen_text(), pair.rejected_text()
            assert chosen != rejected and chosen.split()[0] == rejected.split()[0]
        assert DOMAINS[i % len(DOMAINS)].split()[0] in name
    # Held-out pairs ask questions in phrasings no training pair uses.
    train_questions = {p.prompt for ps in task.train.values() for p in ps}
    test_questions = {p.prompt for ps in task.test.values() for p in ps}
    assert not train_questions & test_questions


def test_the_embedded_task_refuses_bad_parameters() -> None:
    with pytest.raises(SyntheticConfigError, match="fact_share"):
        make_preferences(fact_share=1.5)
    with pytest.raises(SyntheticConfigError, match="own_domain_share"):
        make_preferences(own_domain_share=0)
    with pytest.raises(SyntheticConfigError):
        make_preferences(pairs_per_institution=0)

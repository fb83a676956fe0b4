"""Base models and tokenizers are deterministic, local-only, and refuse what is not a causal LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, ViTConfig

from clients.errors import ModelLoadError
from clients.model_factory import (
    TinyLlamaSpec,
    build_tiny_llama,
    build_tokenizer,
    load_causal_lm,
    save_base,
)
from clients.synthetic import SyntheticFederation


def test_tokenizer_is_deterministic_and_lossless(federation: SyntheticFederation) -> None:
    corpus = list(federation.corpus())
    a = build_tokenizer(corpus, vocab_size=512)
    b = build_tokenizer(reversed(corpus), vocab_size=512)
    assert a.get_vocab() == b.get_vocab() and len(a) == 512
    text = "Warfarin: 5 mg daily — ünïcödé ok"
    ids = a.encode(text, add_special_tokens=False)
    assert ids == b.encode(text, add_special_tokens=False)
    assert a.decode(ids) == text
    with pytest.raises(ModelLoadError, match="vocab_size"):
        build_tokenizer(corpus, vocab_size=100)


def test_tiny_llama_weights_depend_only_on_seed(
    tokenizer: PreTrainedTokenizerFast, small_spec: TinyLlamaSpec
) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    a = build_tiny_llama(len(tokenizer), small_spec)
    b = build_tiny_llama(len(tokenizer), small_spec)
    c = build_tiny_llama(len(tokenizer), TinyLlamaSpec(**{**small_spec.__dict__, "seed": 1}))
    torch.manual_seed(123)
    assert torch.equal(before, torch.rand(1)), "building a model must not consume the global RNG"
    pairs = list(zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert all(torch.equal(x, y) for x, y in pairs)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    with pytest.raises(ModelLoadError, match="multiple of num_heads"):
        build_tiny_llama(len(tokenizer), TinyLlamaSpec(hidden_size=30, num_heads=4))


def test_save_and_load_roundtrip(
    tmp_path: Path, base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    save_base(base, tokenizer, tmp_path)
    model, tok = load_causal_lm(tmp_path)
    ids = torch.tensor([tokenizer.encode("Open the cash ISA")])
    assert tok.encode("Open the cash ISA") == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_load_refuses_missing_and_non_causal_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_causal_lm(tmp_path)
    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(vit)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_causal_lm(vit)

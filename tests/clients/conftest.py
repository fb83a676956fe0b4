"""Shared tiny fixtures: a small synthetic federation, its tokenizer and a small base model."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from clients.model_factory import TinyLlamaSpec, build_tiny_llama, build_tokenizer
from clients.synthetic import SyntheticFederation, make_federation

SMALL = TinyLlamaSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="session")
def federation() -> SyntheticFederation:
    return make_federation(records_per_institution=48, test_records_per_domain=16, seed=1)


@pytest.fixture(scope="session")
def tokenizer(federation: SyntheticFederation) -> PreTrainedTokenizerFast:
    return build_tokenizer(federation.corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def small_spec() -> TinyLlamaSpec:
    return SMALL


@pytest.fixture()
def base(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A fresh base model per test: wrapping it with LoRA modifies it in place."""
    return build_tiny_llama(len(tokenizer), SMALL)

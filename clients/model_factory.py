"""Where base models and tokenizers come from: a tiny embedded Llama, or a user's local directory.

Nothing here touches the network. The embedded default is a Llama-architecture model built from
a :class:`transformers.LlamaConfig` with weights drawn from a seeded torch generator, plus a
byte-level BPE tokenizer trained locally with the ``tokenizers`` library. Every institution and
the server must start from the *same* base model, so both builders are deterministic functions
of their arguments (the seed and the training corpus).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from clients.errors import ModelLoadError

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Size of the embedded model. The defaults train a federated demo in ~2 min on 2 cores."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 172
    max_positions: int = 256
    # 0.2, not Llama's 0.02: LoRA on a random base learns far faster from larger random features
    # (plaintext FedAvg, 4 institutions x 8 rounds x 10 steps: mean eval loss 3.82 vs 4.85).
    initializer_range: float = 0.2
    seed: int = 0


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (deterministic for a given corpus).

    Byte-level means every string is encodable (no unknown token); the initial alphabet is all
    256 bytes, so an empty or tiny corpus still yields a working byte tokenizer.
    """
    if vocab_size < 256 + len(_SPECIAL_TOKENS):
        raise ModelLoadError(
            f"vocab_size={vocab_size} is below the 256 byte symbols plus "
            f"{len(_SPECIAL_TOKENS)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorting makes the merge table independent of the order the corpus was produced in.
    tok.train_from_iterator(sorted(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def build_tiny_llama(vocab_size: int, spec: TinyLlamaSpec | None = None) -> LlamaForCausalLM:
    """A randomly initialised Llama model whose weights depend only on ``spec.seed``.

    The global torch RNG is forked, so building a model does not disturb the caller's seeds.
    """
    spec = spec or TinyLlamaSpec()
    if spec.hidden_size % spec.num_heads != 0:
        raise ModelLoadError(
            f"hidden_size={spec.hidden_size} is not a multiple of num_heads={spec.num_heads}"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.initializer_range,
        # Untied, so the output head is a plain Linear that LoRA can adapt: with random base
        # weights, adapting the head is what lets the tiny model learn a domain quickly.
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model


def build_default_base(
    corpus: Iterable[str], spec: TinyLlamaSpec | None = None, vocab_size: int = 768
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The embedded default: tokenizer trained on ``corpus`` and a tiny Llama sized to it."""
    tokenizer = build_tokenizer(corpus, vocab_size)
    return build_tiny_llama(len(tokenizer), spec), tokenizer


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write model and tokenizer to one directory that :func:`load_causal_lm` reads back."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_causal_lm(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, never from the network."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: model directory does not exist")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory}: no config.json, so this is not a transformers model")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: unreadable model config: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, config=config, local_files_only=True, dtype=torch.float32
        )
    except ValueError as exc:
        # transformers raises ValueError when the config's model type has no causal-LM head.
        raise ModelLoadError(
            f"{directory}: model type {config.model_type!r} is not a causal language model"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"{directory}: cannot load weights: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{directory}: cannot load tokenizer: {exc}") from exc
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

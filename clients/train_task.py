"""The ``train`` task on the client: build the model once, train each round, encode the update.

Per round: load the global trainable LoRA vector the server sent, train locally
(:func:`clients.trainer.train_local`), and encode ``delta`` with weight ``n`` (the local sample
count) for the secure sum, so the server can form the sample-weighted FedAvg mean without
learning any single ``n``. Under the ckks backend the transport encrypts the same ``delta`` and
``n`` (:meth:`LocalTrainer.local_update`) instead of quantizing them. The training seed is
(round seed, round number, client id): a run can be reproduced exactly in one process, which the
integration test does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clients.client_config import ClientConfig, TrainOptions
from clients.data import Example, alpaca_example, load_jsonl, tokenize
from clients.devices import resolve_runtime
from clients.model_factory import build_default_base, load_source, model_source
from clients.synthetic import make_federation
from clients.trainer import (
    LocalResult,
    LoraModel,
    LoraSettings,
    TrainSettings,
    train_local,
)
from fl_core.adapter_io import save_adapter
from fl_core.wire import fedsec_pb2 as pb
from fl_core.wire.toml_config import ConfigError
from secagg.encoding import QuantizationParams, encode
from secagg.errors import ConfigurationError
from secagg.ring import RingArray


def _examples(config: ClientConfig, options: TrainOptions) -> list[Example]:
    if config.jsonl is not None:
        return load_jsonl(config.jsonl)
    federation = make_federation(
        options.institutions, options.records, seed=options.federation_seed
    )
    names = [i.name for i in federation.institutions]
    if config.synthetic not in names:
        raise ConfigError(
            f"data.synthetic = {config.synthetic!r} is not an embedded institution; "
            f"known: {', '.join(names)}"
        )
    institution = federation.institutions[names.index(config.synthetic)]
    return [alpaca_example(r) for r in institution.records]


def optimizer_of(name: str) -> Literal["adamw", "sgd"]:
    """The round's client optimizer; empty from a coordinator that predates the field."""
    if name in ("", "adamw"):
        return "adamw"
    if name == "sgd":
        return "sgd"
    raise ConfigurationError(f"the round asks for optimizer {name!r}; this client has adamw, sgd")


def training_seed(config: pb.RoundConfig, client_id: int) -> int:
    """This client's data-order seed: the same every round, so the order continues."""
    task = config.split.train if config.WhichOneof("task") == "split" else config.train
    return task.seed * 65_537 + client_id


class LocalTrainer:
    def __init__(self, config: ClientConfig) -> None:
        if config.train is None:
            raise ConfigError("this client has no [train] table; it cannot take train rounds")
        options = config.train
        recipe = self.recipe = options.recipe
        if recipe.threads is not None:
            torch.set_num_threads(recipe.threads)
        runtime = resolve_runtime(recipe.device, recipe.precision, recipe.quantization)
        base: PreTrainedModel
        tokenizer: PreTrainedTokenizerBase
        self.source = model_source(options.base)
        if self.source.kind == "embedded":
            federation = make_federation(
                options.institutions, options.records, seed=options.federation_seed
            )
            base, tokenizer = build_default_base(federation.corpus())
        else:
            base, tokenizer = load_source(self.source, runtime)
        self.lm = LoraModel(base, LoraSettings.from_recipe(recipe, init_seed=0), runtime)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.data = tokenize(
            _examples(config, options),
            tokenizer,
            recipe.max_length,
            "local data",
            recipe.chat_template,
        )
        self.client_id = config.client_id
        #: Split rounds: this institution's activation noise ratio (``[split]``).
        self.activation_noise = config.activation_noise
        # Batches drawn in earlier rounds of this process: the data order continues from there
        # (a restarted client starts its order again; it is data order only, nothing secret).
        self.batches_drawn = 0

    def write_initial_adapter(self, directory: Path) -> None:
        """The coordinator's starting adapter; it names a pretrained base (so the coordinator
        takes a pretrained base's recipe defaults), not the embedded one (built, not stored)."""
        save_adapter(directory, self.lm.tensors(), self.lm.adapter_config(self.source.reference()))

    def train(self, config: pb.RoundConfig, global_vector: np.ndarray) -> LocalResult:
        """This round's local training from ``global_vector`` (reproducible from the config
        and the batches this process drew in earlier rounds)."""
        task = config.train
        if task.layout_fingerprint != self.lm.layout.fingerprint():
            raise ConfigurationError(
                "the server's adapter layout differs from this client's LoRA settings "
                "(check [train] lora_rank / lora_mode against the coordinator's adapter)"
            )
        settings = TrainSettings(
            local_steps=task.local_steps or None,
            local_epochs=task.local_epochs or None,
            batch_size=task.batch_size,
            lr=task.learning_rate,
            optimizer=optimizer_of(task.optimizer),
            max_grad_norm=task.max_grad_norm or self.recipe.max_grad_norm,
            seed=training_seed(config, self.client_id),
            num_threads=self.recipe.threads,
            data_offset=self.batches_drawn,
            grad_accum=min(self.recipe.grad_accum, task.batch_size),
        )
        result = train_local(self.lm, global_vector, self.data, settings, self.pad_id)
        self.batches_drawn += result.steps
        return result

    def local_update(self, config: pb.RoundConfig, model: bytes) -> LocalResult:
        """Check the round against this client, train, and return ``delta`` and the weight."""
        task = config.train
        if len(model) != 4 * self.lm.layout.size:
            raise ConfigurationError(
                f"global model of {len(model)} bytes for {self.lm.layout.size} coordinates"
            )
        if len(self.data) > task.max_weight:
            raise ConfigurationError(
                f"{len(self.data)} local samples exceed the round's max_weight {task.max_weight}"
            )
        return self.train(config, np.frombuffer(model, dtype="<f4").astype(np.float32))

    def encoded_update(self, config: pb.RoundConfig, model: bytes) -> RingArray:
        """The masking backend's input: ``weight * delta`` and the weight, quantized."""
        return self.encode(config, self.local_update(config, model), config.train.max_weight)

    @staticmethod
    def encode(config: pb.RoundConfig, result: LocalResult, max_weight: int) -> RingArray:
        """``weight * delta`` and the weight, quantized for the round's ring."""
        quant = QuantizationParams(
            config.ring_bits,
            config.clip,
            config.scale,
            len(config.cohort),
            max_weight=max_weight,
            weighted=True,
        )
        return encode(result.delta, quant, weight=result.num_samples).vector

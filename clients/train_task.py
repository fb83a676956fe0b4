"""The ``train`` task on the client: build the model once, train each round, encode the update.

Per round: load the global trainable LoRA vector the server sent (and SCAFFOLD's server control
variate), train locally with the strategy's options (:func:`clients.trainer.train_local`), and
hand the round core's client step (:meth:`LocalTrainer.contribution`) to the transport, which
encodes it with the round's codec (plain: ``n * delta`` and ``n``, so the server forms the
sample-weighted mean without learning any single ``n``; DP: clipped and noised at weight 1) or,
under ckks, encrypts it. A round whose task names the ``dpo`` objective trains the DPO loss on
the institution's preference pairs instead (:func:`clients.dpo.train_dpo`; ``n`` is then the
pair count), against this round's global vector or, when the task names a reference digest, the
vector the DPO stage's first round sent (kept from that round; a client that did not see it
refuses the stage's rounds, since it cannot compute the reference). The training seed is
(round seed, round number, client id): a run can be reproduced exactly in one process, which the
integration test does.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clients import defaults
from clients.client_config import ClientConfig, TrainOptions
from clients.data import Example, alpaca_example, load_jsonl, tokenize
from clients.devices import resolve_runtime
from clients.dpo import DPO_LOSSES, DpoSettings, train_dpo
from clients.model_factory import build_default_base, load_source, model_source
from clients.preference_data import PreferencePair, TokenizedPairs, load_pairs, tokenize_pairs
from clients.synthetic import make_federation, make_preferences
from clients.trainer import (
    LocalResult,
    LoraModel,
    LoraSettings,
    ScaffoldControls,
    TrainSettings,
    train_local,
)
from fl_core.adapter_io import save_adapter
from fl_core.round import client_contribution
from fl_core.round_config import RoundConfig, TrainTask
from fl_core.strategies import Strategy, build_strategy
from fl_core.toml_config import ConfigError
from secagg.errors import ConfigurationError


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


def _pairs(config: ClientConfig, options: TrainOptions) -> list[PreferencePair] | None:
    if config.preference is not None:
        return [r.pair for r in load_pairs(config.preference)]
    if config.synthetic is None:
        return None
    task = make_preferences(
        options.institutions,
        defaults.PAIRS_PER_INSTITUTION,
        defaults.TEST_PAIRS_PER_INSTITUTION,
        defaults.OWN_DOMAIN_SHARE,
        seed=options.federation_seed,
    )
    if config.synthetic not in task.train:
        return None  # refused with the SFT data's message
    return list(task.train[config.synthetic])


def optimizer_of(name: str) -> Literal["adamw", "sgd"]:
    """The round's client optimizer; empty from a coordinator that predates the field."""
    if name in ("", "adamw"):
        return "adamw"
    if name == "sgd":
        return "sgd"
    raise ConfigurationError(f"the round asks for optimizer {name!r}; this client has adamw, sgd")


def training_seed(task: TrainTask, client_id: int) -> int:
    """This client's data-order seed: the same every round, so the order continues."""
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
        pairs = _pairs(config, options)
        self.pairs: TokenizedPairs | None = None
        if pairs is not None:
            self.pairs = tokenize_pairs(
                pairs, tokenizer, recipe.max_length, "local preference pairs", recipe.chat_template
            )
        self.client_id = config.client_id
        #: Split rounds: this institution's activation noise ratio (``[split]``).
        self.activation_noise = config.activation_noise
        #: SCAFFOLD: this client's control variate c_i, kept between rounds.
        self._control: np.ndarray | None = None
        # Batches drawn in earlier rounds of this process: the data order continues from there
        # (a restarted client starts its order again; it is data order only, nothing secret).
        self.batches_drawn = 0
        self._pair_batches_drawn = 0
        #: The DPO stage's reference (its digest and vector), kept from the stage's first round.
        self._reference: tuple[bytes, np.ndarray] | None = None

    def write_initial_adapter(self, directory: Path) -> None:
        """The coordinator's starting adapter; it names a pretrained base (so the coordinator
        takes a pretrained base's recipe defaults), not the embedded one (built, not stored)."""
        save_adapter(directory, self.lm.tensors(), self.lm.adapter_config(self.source.reference()))

    def train(
        self,
        task: TrainTask,
        global_vector: np.ndarray,
        server_control: np.ndarray | None = None,
    ) -> LocalResult:
        """This round's local training from ``global_vector`` (reproducible from the task
        and the batches this process drew in earlier rounds), with the strategy's options:
        FedProx's proximal term, SCAFFOLD's control variates (this client's own is kept here
        between rounds; a restarted client starts again from zero, which SCAFFOLD allows)."""
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
            seed=training_seed(task, self.client_id),
            num_threads=self.recipe.threads,
            data_offset=self.batches_drawn,
            grad_accum=min(self.recipe.grad_accum, task.batch_size),
            prox_mu=task.prox_mu,
        )
        scaffold = None
        if server_control is not None:
            mine = self._control if self._control is not None else np.zeros_like(server_control)
            scaffold = ScaffoldControls(server_control, mine)
        objective = task.objective or "sft"
        if objective == "sft":
            result = train_local(self.lm, global_vector, self.data, settings, self.pad_id, scaffold)
            self.batches_drawn += result.steps
        else:
            result = self._train_dpo(task, global_vector, settings, scaffold)
        if result.new_client_control is not None:
            self._control = result.new_client_control
        return result

    def _train_dpo(
        self,
        task: TrainTask,
        global_vector: np.ndarray,
        settings: TrainSettings,
        scaffold: ScaffoldControls | None,
    ) -> LocalResult:
        if task.objective != "dpo":
            raise ConfigurationError(
                f"the round asks for objective {task.objective!r}; this client trains sft, dpo"
            )
        if task.dpo_loss not in DPO_LOSSES:
            raise ConfigurationError(
                f"the round asks for DPO loss {task.dpo_loss!r}; this client has "
                + ", ".join(DPO_LOSSES)
            )
        pairs = self._require_pairs()
        result = train_dpo(
            self.lm,
            global_vector,
            pairs,
            replace(settings, data_offset=self._pair_batches_drawn),
            DpoSettings(task.dpo_beta, task.dpo_loss),
            self.pad_id,
            self._dpo_reference(task.dpo_reference, global_vector),
            scaffold,
        )
        self._pair_batches_drawn += result.steps
        return result

    def _require_pairs(self) -> TokenizedPairs:
        if self.pairs is None:
            raise ConfigurationError(
                "the round trains DPO but this client has no preference pairs: set [data] "
                "preference (or synthetic, for an embedded institution)"
            )
        return self.pairs

    def _dpo_reference(self, digest: bytes, global_vector: np.ndarray) -> np.ndarray | None:
        """The reference vector a DPO round names (None: this round's global vector)."""
        if not digest:
            return None
        if self._reference is not None and self._reference[0] == digest:
            return self._reference[1]
        served = hashlib.sha256(np.ascontiguousarray(global_vector, "<f4").tobytes()).digest()
        if served == digest:
            # The stage's first round: the vector it sent is the stage's reference.
            self._reference = (digest, global_vector.copy())
            return None
        raise ConfigurationError(
            "the round's DPO reference is the vector of the DPO stage's first round, which this "
            "client did not receive (it joined or restarted later); it cannot compute the "
            "reference log-probabilities"
        )

    def local_update(self, task: TrainTask, model: bytes) -> LocalResult:
        """Check the round's task against this client and train. ``model`` is the global
        vector, followed by SCAFFOLD's server control variate when the round carries one."""
        size = self.lm.layout.size
        expected = 4 * size * (2 if task.server_control else 1)
        if len(model) != expected:
            raise ConfigurationError(
                f"global model of {len(model)} bytes, expected {expected} for {size} coordinates"
                + (" and the server control variate" if task.server_control else "")
            )
        weight = len(self._require_pairs()) if task.objective == "dpo" else len(self.data)
        if weight > task.max_weight:
            raise ConfigurationError(
                f"{weight} local samples exceed the round's max_weight {task.max_weight}"
            )
        vectors = np.frombuffer(model, dtype="<f4").astype(np.float32)
        control = vectors[size:] if task.server_control else None
        return self.train(task, vectors[:size], control)

    def contribution(
        self, config: RoundConfig, task: TrainTask, model: bytes
    ) -> tuple[np.ndarray, int]:
        """Train ``config``'s ``task``, then the round core's client step
        (:func:`contribution_of`)."""
        return contribution_of(config, self.local_update(task, model), self.lm.layout.size)


def contribution_of(config: RoundConfig, result: LocalResult, dim: int) -> tuple[np.ndarray, int]:
    """The round core's client step (:func:`fl_core.round.client_contribution`) by the server's
    strategy's client-side rule, for a ``train`` or ``split`` round (``dim``: the trained
    vector's length, the client part's in split): the codec's (or CKKS's) input and its
    integer weight."""
    train = config.train
    if train is None:
        raise ConfigurationError(f"round {config.round_number} trains nothing")
    rule = client_rule(train.strategy or "fedavg", dim)
    return client_contribution(
        rule,
        result.delta,
        result.num_samples,
        result.control_delta,
        dp=config.dp is not None,
    )


def client_rule(strategy: str, dim: int) -> Strategy:
    """The strategy object whose client-side rule (contribution, weight) a client applies; its
    server-side state is never used here."""
    hparams = {"num_clients": 1} if strategy == "scaffold" else {}
    return build_strategy(strategy, dim, hparams)

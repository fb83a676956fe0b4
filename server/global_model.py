"""The server's global model and what turns a released secure sum into the next one.

The server never trains and never sees an individual update. For the ``train`` task it holds
the trainable LoRA coordinates as one float32 vector (layout from the initial PEFT adapter:
all A and B tensors, or only B in FFA-LoRA mode, where A stays at the shared initialisation),
sends it with every round, and applies the configured strategy to what the secure sum
releases: sum of w*delta, sum of w (clients add their sample count w as one more coordinate,
so the server learns only the cohort's total) and the number of contributors. Each completed
round is checkpointed as safetensors (vector + strategy state) and as a PEFT adapter directory
any ``peft`` user can load. The ``random`` task has no model: the "global" vector is the running
sum of the decoded mean updates, which is what the load test and the drills check.

Under the ckks backend the server never decodes anything: a client decrypts the sum and the
server applies it through :meth:`GlobalModel.apply_sum`, the same step the masking path ends in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_core.adapter_io import AdapterConfig, load_adapter, save_adapter
from fl_core.errors import AdapterFormatError
from fl_core.split import SplitLayout
from fl_core.strategies import AggregateInput, Strategy, build_strategy
from fl_core.updates import LoraLayout
from fl_core.wire import fedsec_pb2 as pb
from fl_core.wire.convert import train_task_of
from fl_core.wire.toml_config import ConfigError
from secagg.encoding import QuantizationParams, decode_sum
from secagg.protocol import AggregateResult
from server.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from server.config import ServerConfig


@dataclass(frozen=True)
class _Adapter:
    tensors: dict[str, np.ndarray]  # the initial adapter: the frozen tensors come from here
    config: AdapterConfig
    layout: LoraLayout  # the trainable part, in the global vector's order


class GlobalModel:
    """``split``: the layout the split model found (:class:`fl_core.split.SplitLayout`); the
    global vector is then the institutions' part, and checkpoints add the server's part."""

    def __init__(self, config: ServerConfig, split: SplitLayout | None = None) -> None:
        self._config = config
        task = config.task
        self._adapter: _Adapter | None = None
        self._split = split
        if task.trains:
            if task.initial_adapter is None:
                raise ConfigError(f'task.initial_adapter is required for kind = "{task.kind}"')
            try:
                tensors, adapter_config = load_adapter(task.initial_adapter)
            except (AdapterFormatError, OSError) as exc:
                raise ConfigError(f"task.initial_adapter: {exc}") from None
            full = LoraLayout.from_tensors(tensors)
            layout = (
                full.select(lambda name: ".lora_B." in name) if task.lora_mode == "ffa" else full
            )
            if split is not None:
                if split.full != layout:
                    raise ConfigError(
                        "task.initial_adapter: its trainable tensors differ from the split "
                        "model's (lora_mode, targets or the base)"
                    )
                layout = split.client
            self._adapter = _Adapter(tensors, adapter_config, layout)
            self.vector = layout.flatten({k: tensors[k] for k in layout.names})
        else:
            self.vector = np.zeros(task.dim, dtype=np.float32)
        self.strategy: Strategy = build_strategy(
            task.recipe.strategy, self.vector.size, task.recipe.params()
        )
        options = self.strategy.client_options()
        if options.prox_mu or options.server_control is not None:
            raise ConfigError(
                f"strategy {task.recipe.strategy} needs client options; not supported"
            )

    # --- rounds -----------------------------------------------------------------------------

    def quantization(self, cohort_size: int) -> QuantizationParams:
        rounds, task = self._config.rounds, self._config.task
        if task.trains:
            return QuantizationParams.fit(
                rounds.ring_bits, task.clip, cohort_size, task.max_weight, weighted=True
            )
        return QuantizationParams.fit(rounds.ring_bits, task.clip, max_clients=cohort_size)

    def fill_round(self, config: pb.RoundConfig) -> bytes:
        """Set the task fields of ``config``; returns the payload that follows RoundStart.

        Under masking, ``dim`` is the length of the ring vector (plus the weight coordinate in
        weighted mode) and ``scale`` the fixed-point scale; under ckks, ``dim`` is the model
        vector's length (the CKKS envelope adds the weight slot itself) and there is no scale.
        """
        task, rounds = self._config.task, self._config.rounds
        quant = (
            self.quantization(len(config.cohort)) if config.backend == pb.BACKEND_MASKING else None
        )
        config.clip = task.clip
        if quant is not None:
            config.scale = quant.scale
        if self._adapter is None:
            config.dim = self.vector.size
            config.model_dim = 0
            config.random.seed = rounds.seed
            return b""
        config.weighted = True
        config.dim = self.vector.size if quant is None else quant.encoded_dim(self.vector.size)
        config.model_dim = self.vector.size
        # A split round carries the same local-training fields (the cut is the split service's).
        train = config.split.train if self._split is not None else config.train
        train.seed = rounds.seed
        recipe = task.recipe
        train.local_steps = recipe.local_steps or 0
        train.local_epochs = recipe.local_epochs or 0
        # The recipe's schedule, evaluated here: clients get this round's rate.
        train.learning_rate = recipe.lr_at(
            min(config.round_number, rounds.rounds - 1), rounds.rounds
        )
        train.batch_size = recipe.batch_size
        train.optimizer = recipe.optimizer
        train.max_grad_norm = recipe.max_grad_norm
        train.max_weight = task.max_weight
        train.layout_fingerprint = self._adapter.layout.fingerprint()
        return self.vector.astype("<f4").tobytes()

    def decode(self, config: pb.RoundConfig, result: AggregateResult) -> AggregateInput:
        """A masking round's released ring sum as floats, ready for :meth:`apply_sum`."""
        quant = QuantizationParams(
            config.ring_bits,
            config.clip,
            config.scale,
            max_clients=len(config.cohort),
            max_weight=train_task_of(config).max_weight if config.weighted else 1,
            weighted=config.weighted,
        )
        decoded = decode_sum(result.sum, quant, len(result.contributors))
        return AggregateInput(
            decoded.total.astype(np.float64), decoded.weight, len(result.contributors)
        )

    def apply_sum(self, released: AggregateInput) -> None:
        """Apply the strategy to an already decoded sum (a ckks round's decrypted release)."""
        if released.contribution_sum.shape != self.vector.shape:
            raise ConfigError(
                f"released sum has {released.contribution_sum.size} coordinates, the global "
                f"model has {self.vector.size}"
            )
        self.vector = self.strategy.aggregate(self.vector, released).astype(np.float32)

    # --- persistence ------------------------------------------------------------------------

    def save(
        self, directory: Path, round_number: int, server_part: np.ndarray | None = None
    ) -> Path:
        """Checkpoint (and, for LoRA, a PEFT adapter directory beside it); returns the file.
        ``server_part``: split training's server part, checkpointed with the round."""
        state = self.strategy.state_dict()
        path = save_checkpoint(directory, Checkpoint(round_number, self.vector, state, server_part))
        if self._adapter is not None:
            tensors = dict(self._adapter.tensors)
            tensors.update(self._adapter.layout.unflatten(self.vector))
            if self._split is not None and server_part is not None:
                tensors.update(self._split.server.unflatten(server_part.astype(np.float32)))
            save_adapter(directory / f"adapter-{round_number:06d}", tensors, self._adapter.config)
        return path

    def restore(self, path: Path) -> np.ndarray | None:
        """Load a checkpoint; returns split training's server part (None if it has none)."""
        checkpoint = load_checkpoint(path)
        if checkpoint.global_vector.size != self.vector.size:
            raise ConfigError(
                f"{path}: checkpoint has {checkpoint.global_vector.size} coordinates, the "
                f"configured model has {self.vector.size}"
            )
        self.vector = checkpoint.global_vector.copy()
        if checkpoint.strategy_state:
            self.strategy.load_state_dict(checkpoint.strategy_state)
        return checkpoint.server_part

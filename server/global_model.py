"""The server's global model and what turns a released secure sum into the next one.

The server never sees an individual update. For the ``train`` task it holds
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

A recipe with a DPO stage (``[task] stage = "dpo"`` or ``"sft+dpo"``) makes each round's task
name its objective; the update, its encoding and the strategy step are the same for both. With
``dpo_reference = "sft"`` every DPO round also names its reference by digest: the SHA-256 of the
global vector the stage's first round sent, which each client keeps from that round. The server
keeps only that digest (``dpo-reference.sha256`` beside the checkpoints, so a restarted server
names the same reference).

For the ``split`` task the global vector is the institutions' part of the adapter only (their
blocks and the head), aggregated through the same codec and strategy; the server trains the
blocks between itself (:mod:`server.split_service`), and each checkpoint and adapter directory
also holds that part.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_core.adapter_io import AdapterConfig, load_adapter, save_adapter
from fl_core.errors import AdapterFormatError
from fl_core.round import EncodingSpec, calibrate_run
from fl_core.round_config import (
    CkksAggregation,
    CkksRound,
    MaskingRound,
    RandomTask,
    RoundConfig,
    SplitTask,
    TrainTask,
)
from fl_core.split import SplitLayout
from fl_core.strategies import AggregateInput, Strategy, build_strategy
from fl_core.toml_config import ConfigError
from fl_core.updates import LoraLayout
from secagg.dp.calibration import Calibration
from secagg.errors import ConfigurationError
from secagg.params import SessionShape
from secagg.protocol import AggregateResult
from server.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from server.config import ServerConfig

#: Where the DPO stage's reference digest is kept, beside the checkpoints.
DPO_REFERENCE_FILE = "dpo-reference.sha256"


def vector_digest(vector: np.ndarray) -> bytes:
    """SHA-256 of a global vector as it travels (little-endian float32)."""
    return hashlib.sha256(np.ascontiguousarray(vector, "<f4").tobytes()).digest()


def _calibrate(config: ServerConfig, contribution_size: int) -> Calibration:
    """The run's DP noise: against the server, each institution may be in every round (the
    coordinator draws cohorts from whoever is online), no amplification; sized for the
    fewest contributors a round may release, which every session enforces."""
    dp, rounds = config.dp, config.rounds
    if dp is None:
        raise ConfigError("no [dp] to calibrate")
    floor = rounds.dp_floor(rounds.cohort_size)
    try:
        return calibrate_run(
            dp,
            participations=rounds.rounds,
            cohort=rounds.cohort_size,
            floor=floor,
            contribution_size=contribution_size,
        )
    except ConfigurationError as exc:
        raise ConfigError(f"[dp]: {exc}") from None


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
        hparams = dict(task.recipe.params()) if task.trains else {}
        if task.recipe.strategy == "scaffold":
            hparams.setdefault("num_clients", len(config.roster))  # N: the whole population
        self.strategy: Strategy = build_strategy(task.recipe.strategy, self.vector.size, hparams)
        weighted = self.strategy.client_weight(2) != self.strategy.client_weight(1)
        self.calibration: Calibration | None = None
        if config.dp is not None:
            self.calibration = _calibrate(config, self.strategy.contribution_size())
        self.encoding = EncodingSpec(
            self.strategy.contribution_size(),
            config.rounds.ring_bits,
            task.clip,
            max_weight=task.max_weight if task.trains and weighted else 1,
            weighted=task.trains and weighted,
            dp=None if self.calibration is None else self.calibration.params,
        )
        #: The DPO stage's reference (``dpo_reference = "sft"``), by digest, once it started.
        self.dpo_reference: bytes | None = None

    # --- rounds -----------------------------------------------------------------------------

    @property
    def min_survivors(self) -> int:
        """With DP, the contributors every release must have (the noise is sized for them)."""
        return 0 if self.calibration is None else self.calibration.min_contributors

    def round_config(
        self,
        round_number: int,
        session_id: bytes,
        cohort: tuple[int, ...],
        backend: SessionShape | CkksRound,
        split: Callable[[TrainTask], SplitTask] | None = None,
    ) -> tuple[RoundConfig, bytes]:
        """The round to announce, and the payload that follows RoundStart (the global vector,
        and SCAFFOLD's server control variate after it).

        ``backend``: the masking session's shape, whose round gets this federation's codec
        (:class:`fl_core.round.RoundCodec`, plain or DP) and release floor; or the CKKS
        parameters, whose round gets the clip and the contribution's length (the CKKS envelope
        adds the weight slot itself). ``split``: a split round's cut around its train task
        (the split service's), required when the model is split.
        """
        task, rounds = self._config.task, self._config.rounds
        aggregation: MaskingRound | CkksAggregation
        if isinstance(backend, CkksRound):
            contribution = self.strategy.contribution_size()
            aggregation = CkksAggregation(
                backend, task.clip, contribution, self._adapter is not None
            )
        else:
            codec = self.encoding.codec(len(cohort))
            aggregation = MaskingRound(backend, codec, self.min_survivors)
        if self._adapter is None:
            random = RandomTask(rounds.seed)
            return RoundConfig(round_number, session_id, cohort, aggregation, random), b""
        train = self._train_task(round_number)
        payload = self.vector.astype("<f4").tobytes()
        server_control = self.strategy.client_options().server_control
        if server_control is not None:
            payload += server_control.astype("<f4").tobytes()
        if self._split is None:
            announced: TrainTask | SplitTask = train
        elif split is None:
            raise ConfigError("a split model's round needs the split service's cut")
        else:
            announced = split(train)
        config = RoundConfig(
            round_number, session_id, cohort, aggregation, announced, self.vector.size
        )
        return config, payload

    def _train_task(self, round_number: int) -> TrainTask:
        task, rounds = self._config.task, self._config.rounds
        recipe = task.recipe
        options = self.strategy.client_options()
        # The recipe's schedule, evaluated here: clients get this round's rate.
        at = min(round_number, rounds.rounds - 1)
        if self._adapter is None:
            raise ConfigError(f'kind = "{task.kind}" trains no model')
        objective, dpo_beta, dpo_loss, dpo_reference = self._objective(at)
        return TrainTask(
            seed=rounds.seed,
            local_steps=recipe.local_steps or 0,
            learning_rate=recipe.lr_at(at, rounds.rounds),
            batch_size=recipe.batch_size,
            max_weight=task.max_weight,
            layout_fingerprint=self._adapter.layout.fingerprint(),
            local_epochs=recipe.local_epochs or 0,
            optimizer=recipe.optimizer,
            max_grad_norm=recipe.max_grad_norm,
            strategy=self.strategy.name,
            prox_mu=options.prox_mu,
            server_control=options.server_control is not None,
            objective=objective,
            dpo_beta=dpo_beta,
            dpo_loss=dpo_loss,
            dpo_reference=dpo_reference,
        )

    def _objective(self, round_number: int) -> tuple[str, float, str, bytes]:
        """The train task's objective, DPO beta, DPO loss and DPO reference for this round (the
        last three empty outside the DPO stage)."""
        recipe, rounds = self._config.task.recipe, self._config.rounds.rounds
        objective = recipe.objective_at(round_number, rounds)
        if objective != "dpo":
            return objective, 0.0, "", b""
        if recipe.dpo_reference != "sft":
            return objective, recipe.dpo_beta, recipe.dpo_loss, b""
        if self.dpo_reference is None:
            if round_number != recipe.dpo_start(rounds):
                raise ConfigError(
                    f"round {round_number} is in the DPO stage but the stage's reference digest "
                    f"({DPO_REFERENCE_FILE}) is missing from the state directory; it cannot be "
                    "recovered, restart the stage"
                )
            # The stage starts from the vector this round sends: the reference of its rounds.
            self.dpo_reference = vector_digest(self.vector)
        return objective, recipe.dpo_beta, recipe.dpo_loss, self.dpo_reference

    def decode(self, config: RoundConfig, result: AggregateResult) -> AggregateInput:
        """A masking round's released ring sum as the strategy's input, by the codec the round
        was sent with."""
        return config.masking.codec.decode(result.sum, len(result.contributors))

    def apply_sum(self, released: AggregateInput) -> None:
        """Apply the strategy to a decoded sum (both backends end here)."""
        if released.contribution_sum.shape != (self.strategy.contribution_size(),):
            raise ConfigError(
                f"released sum has {released.contribution_sum.size} coordinates, the strategy "
                f"expects {self.strategy.contribution_size()}"
            )
        self.vector = self.strategy.aggregate(self.vector, released).astype(np.float32)

    # --- persistence ------------------------------------------------------------------------

    def save(
        self, directory: Path, round_number: int, server_part: np.ndarray | None = None
    ) -> tuple[Path, Path | None]:
        """Checkpoint, and for LoRA a PEFT adapter directory beside it; returns both paths.
        ``server_part``: split training's server part, checkpointed with the round (and in the
        adapter, which then holds the whole model)."""
        state = self.strategy.state_dict()
        path = save_checkpoint(directory, Checkpoint(round_number, self.vector, state, server_part))
        reference = directory / DPO_REFERENCE_FILE
        if self.dpo_reference is not None and not reference.is_file():
            tmp = reference.with_suffix(".tmp")
            tmp.write_text(self.dpo_reference.hex() + "\n")
            os.replace(tmp, reference)
        if self._adapter is None:
            return path, None
        tensors = dict(self._adapter.tensors)
        tensors.update(self._adapter.layout.unflatten(self.vector))
        if self._split is not None and server_part is not None:
            tensors.update(self._split.server.unflatten(server_part.astype(np.float32)))
        adapter = directory / f"adapter-{round_number:06d}"
        save_adapter(adapter, tensors, self._adapter.config)
        return path, adapter

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
        reference = path.parent / DPO_REFERENCE_FILE
        if reference.is_file():
            try:
                self.dpo_reference = bytes.fromhex(reference.read_text().strip())
            except ValueError as exc:
                raise ConfigError(f"{reference}: not a hex SHA-256 digest: {exc}") from None
            if len(self.dpo_reference) != 32:
                raise ConfigError(f"{reference}: not a SHA-256 digest (32 bytes)")
        return checkpoint.server_part

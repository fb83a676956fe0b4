"""The ``split`` task on a deployed institution: check the round, run its steps, return the update.

The institution's :class:`~clients.train_task.LocalTrainer` (its model, data and data position)
serves both tasks. A split round's global model is the *client part* of the adapter; before
opening its stream the institution checks, and refuses with a one-line reason, everything it can:
a cut its model cannot take, a client-part layout other than its own (the fingerprint), another
hidden width, a model of the wrong size, more samples than the round's ``max_weight``, and
examples longer than the round lets a step carry, SCAFFOLD. Then it trains through the link
(:func:`clients.split.trainer.split_train_local`), adding its own activation noise
(``[split] activation_noise``) and FedProx's proximal term when the round sets one, and returns
the update of its part, which the transport hands to the round core's client step
(:func:`clients.train_task.contribution_of`) exactly as a train round's update.
"""

from __future__ import annotations

import numpy as np

from clients.split.model import MiddleLink, SplitModel
from clients.split.trainer import split_train_local
from clients.train_task import LocalTrainer, optimizer_of, training_seed
from clients.trainer import LocalResult, TrainSettings
from fl_core.round_config import SplitTask
from secagg.errors import ConfigurationError


def split_model_for(trainer: LocalTrainer, task: SplitTask, model: bytes) -> SplitModel:
    """This institution's model cut as the round says, after every check it can make."""
    split = SplitModel(trainer.lm, task.spec)
    if task.train.layout_fingerprint != split.layout.client.fingerprint():
        raise ConfigurationError(
            "the server's client-part layout differs from this institution's (check [train] "
            "lora_rank / lora_mode / lora_targets against the coordinator's adapter, and the cut)"
        )
    if task.hidden_size != split.hidden_size:
        raise ConfigurationError(
            f"the round's hidden width is {task.hidden_size}, this model's {split.hidden_size}"
        )
    if len(model) != 4 * split.layout.client.size:
        raise ConfigurationError(
            f"global client part of {len(model)} bytes for {split.layout.client.size} coordinates"
        )
    if len(trainer.data) > task.train.max_weight:
        raise ConfigurationError(
            f"{len(trainer.data)} local samples exceed the round's max_weight "
            f"{task.train.max_weight}"
        )
    longest = max(len(ids) for ids in trainer.data.input_ids)
    if longest > task.max_length:
        raise ConfigurationError(
            f"this institution's examples reach {longest} tokens; the round's steps carry at "
            f"most {task.max_length}: set [train] max_length <= {task.max_length}"
        )
    if task.train.server_control:
        raise ConfigurationError(
            "the round asks for SCAFFOLD control variates, which split training does not offer"
        )
    if task.train.batch_size < 1 or task.train.local_steps < 1:
        raise ConfigurationError("a split round needs batch_size >= 1 and local_steps >= 1")
    return split


def split_update(
    trainer: LocalTrainer, split_task: SplitTask, model: bytes, link: MiddleLink
) -> LocalResult:
    """This round's steps through ``link``; the update of the client part and its weight."""
    split = split_model_for(trainer, split_task, model)
    task = split_task.train
    settings = TrainSettings(
        local_steps=task.local_steps,
        batch_size=task.batch_size,
        lr=task.learning_rate,
        optimizer=optimizer_of(task.optimizer),
        max_grad_norm=task.max_grad_norm or trainer.recipe.max_grad_norm,
        seed=training_seed(task, trainer.client_id),
        num_threads=trainer.recipe.threads,
        data_offset=trainer.batches_drawn,
        prox_mu=task.prox_mu,
    )
    global_client = np.frombuffer(model, dtype="<f4").astype(np.float32)
    result = split_train_local(
        split, global_client, trainer.data, settings, trainer.pad_id, link, trainer.activation_noise
    )
    trainer.batches_drawn += result.steps
    return result

"""An institution's local round of split training, and the one-process federation around it.

:func:`split_train_local` is :func:`clients.trainer.train_local` for a split model: it starts
from the global *client part* (the institution's LoRA tensors: its blocks and the head), runs
``local_steps`` U-shaped steps through a :class:`~clients.split.model.MiddleLink`, and returns the
update of the client part only. The server's part is trained by the server during those steps
and never leaves it.

:class:`SplitTrainer` plugs split training into :class:`fl_core.federation.Federation`, which is
unchanged: it samples cohorts, aggregates the client parts with the configured secure-aggregation
backend (masking or CKKS, DP optional) and applies the strategy, so the server only ever learns
the sum of the institutions' parts. The trainer serves the cohort's steps in the round's order
through an :class:`InProcessLink` to a :class:`~clients.split.middle.MiddleServer`, the same
server-side code a gRPC deployment runs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clients.data import IGNORE_INDEX, TokenizedDataset
from clients.split.middle import MiddleServer, MiddleSettings, Observer
from clients.split.model import MiddleLink, SplitModel
from clients.trainer import (
    LocalResult,
    LoraModel,
    TrainingConfigError,
    TrainSettings,
    batch_indices,
    evaluate,
)
from fl_core.errors import NonFiniteUpdateError
from fl_core.federation import ClientUpdate, Federation, FederationConfig
from fl_core.split import SplitSpec, StepLimits
from fl_core.strategies import ClientOptions
from fl_core.updates import check_finite


def padded_batch(
    data: TokenizedDataset, order: np.ndarray, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, labels and mask of the examples ``order``, right-padded to the longest."""
    width = max(len(data.input_ids[i]) for i in order)
    ids = np.full((len(order), width), pad_id, dtype=np.int64)
    labels = np.full((len(order), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(order), width), dtype=np.int64)
    for row, i in enumerate(order):
        n = len(data.input_ids[i])
        ids[row, :n], labels[row, :n], mask[row, :n] = data.input_ids[i], data.labels[i], 1
    return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the response tokens (the trainer's objective)."""
    shifted, target = logits[:, :-1].float(), labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / max(int((target != IGNORE_INDEX).sum()), 1)


def split_train_local(
    split: SplitModel,
    global_client: np.ndarray,
    data: TokenizedDataset,
    settings: TrainSettings,
    pad_id: int,
    link: MiddleLink,
    noise: float = 0.0,
) -> LocalResult:
    """Train the client part from ``global_client`` through ``link``; returns its update."""
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    check_finite(global_client, "global client part")
    split.set_client_vector(global_client)
    params = split.client_parameters()
    anchors = [p.detach().clone() for p in params]
    if settings.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=settings.lr)
    else:
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = settings.local_steps or (settings.local_epochs or 0) * steps_per_epoch
    batches = batch_indices(
        len(data), settings.batch_size, settings.seed, settings.data_offset, total
    )
    losses: list[float] = []
    split.lm.model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                int(
                    np.random.SeedSequence([settings.seed, settings.data_offset]).generate_state(1)[
                        0
                    ]
                )
            )
            device = split.lm.runtime.device
            for step, batch in enumerate(batches):
                ids, labels, mask = (t.to(device) for t in padded_batch(data, batch, pad_id))
                logits, _ = split.client_logits(ids, mask, link, step, noise)
                loss = response_loss(logits, labels)
                objective = loss
                if settings.prox_mu > 0:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    objective = loss + 0.5 * settings.prox_mu * prox
                opt.zero_grad(set_to_none=True)
                objective.backward()  # type: ignore[no-untyped-call]  # runs the server's step
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        split.lm.model.eval()
    delta = split.client_vector() - global_client
    mean_loss = float(np.mean(losses))
    if not math.isfinite(mean_loss):
        raise NonFiniteUpdateError(f"training loss became {mean_loss}; refusing to submit")
    check_finite(delta, "local update of the client part")
    return LocalResult(delta.astype(np.float32), len(data), mean_loss, total)


@dataclass
class InProcessLink:
    """An institution's link to a :class:`MiddleServer` in the same process."""

    middle: MiddleServer
    client: int

    def forward(self, step: int, hidden: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return self.middle.activation(self.client, step, hidden, lengths)

    def backward(self, step: int, grad: np.ndarray) -> np.ndarray:
        return self.middle.gradient(self.client, step, grad)


@dataclass
class SplitTrainer:
    """Split training of every institution in one process (a :class:`ClientTrainer`).

    ``client`` is the institutions' model (shared, used in turn, as
    :class:`clients.simulation.TorchTrainer` shares one), ``middle`` the server's. The
    ``schedule`` is the federation's cohorts (:meth:`FederationConfig.schedule`, public), from
    which each round's turn order is opened on the server; a call out of that order is refused
    by the round (:class:`~fl_core.split.NotYourTurn`).
    """

    client: SplitModel
    middle: MiddleServer
    train_sets: Mapping[str, TokenizedDataset]
    test_sets: Mapping[str, TokenizedDataset]
    pad_id: int
    settings: TrainSettings
    seed: int
    schedule: Sequence[tuple[str, ...]]
    max_length: int
    noise: float = 0.0
    batches_drawn: dict[str, int] = field(default_factory=dict)
    _round: int | None = None

    def __post_init__(self) -> None:
        if self.settings.local_steps is None:
            raise TrainingConfigError("split training counts local_steps (the server's schedule)")

    @property
    def ids(self) -> dict[str, int]:
        """Secure-aggregation ids: 1-based positions in the sorted institutions (as the
        federation numbers them)."""
        return {name: i + 1 for i, name in enumerate(sorted(self.train_sets))}

    def limits(self) -> StepLimits:
        return self.client.limits(self.settings.batch_size, self.max_length)

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        if options.server_control is not None:
            raise TrainingConfigError("SCAFFOLD is not offered in split mode")
        ids = self.ids
        if self._round != round_index:
            order = sorted(ids[name] for name in self.schedule[round_index])
            steps = self.settings.local_steps or 0
            self.middle.begin_round(order, steps, self.limits())
            self._round = round_index
        index = sorted(self.train_sets).index(client)
        settings = TrainSettings(
            local_steps=self.settings.local_steps,
            batch_size=self.settings.batch_size,
            lr=options.lr if options.lr is not None else self.settings.lr,
            optimizer=self.settings.optimizer,
            seed=self.seed * 1_000_003 + index,
            data_offset=self.batches_drawn.get(client, 0),
            prox_mu=options.prox_mu,
            max_grad_norm=self.settings.max_grad_norm,
            num_threads=self.settings.num_threads,
        )
        result = split_train_local(
            self.client,
            global_vector,
            self.train_sets[client],
            settings,
            self.pad_id,
            InProcessLink(self.middle, ids[client]),
            self.noise,
        )
        self.batches_drawn[client] = self.batches_drawn.get(client, 0) + result.steps
        return ClientUpdate(result.delta, result.num_samples, result.mean_loss)

    def full_vector(self, client_vector: np.ndarray) -> np.ndarray:
        """The whole trainable adapter: the global client part and the server's part."""
        return self.client.layout.join(client_vector, self.middle.vector())

    def evaluate(self, client_vector: np.ndarray) -> dict[str, float]:
        """Eval loss of the whole model (no activation noise: the model, not the channel)."""
        return evaluate(
            self.client.lm, self.full_vector(client_vector), self.test_sets, self.pad_id
        )

    def adapter_tensors(self, client_vector: np.ndarray) -> dict[str, np.ndarray]:
        """The full PEFT adapter (both parts; A and B), for the run directory."""
        self.client.lm.set_vector(self.full_vector(client_vector))
        return self.client.lm.tensors()


@dataclass(frozen=True)
class SplitOptions:
    """Split mode's settings: the cut, the institutions' activation noise (a defence: noise
    standard deviation over each position's activation RMS, 0 for none) and the server's
    learning rate (None: the clients')."""

    spec: SplitSpec = field(default_factory=SplitSpec)
    noise: float = 0.0
    server_lr: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise TrainingConfigError(f"activation noise must be >= 0, got {self.noise}")
        if self.server_lr is not None and not self.server_lr > 0:
            raise TrainingConfigError(f"the server's lr must be > 0, got {self.server_lr}")

    def to_json(self) -> dict[str, Any]:
        """``run.json``'s ``split`` (``--resume`` rebuilds the options from it)."""
        return {
            "client_bottom": self.spec.client_bottom,
            "client_top": self.spec.client_top,
            "activation_noise": self.noise,
            "server_lr": self.server_lr,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> SplitOptions | None:
        """The options :meth:`to_json` wrote (None: the run is not split)."""
        if data is None:
            return None
        return cls(
            SplitSpec(int(data["client_bottom"]), int(data["client_top"])),
            float(data["activation_noise"]),
            None if data["server_lr"] is None else float(data["server_lr"]),
        )


def split_federation(
    lm: LoraModel,
    pad_id: int,
    train_sets: Mapping[str, TokenizedDataset],
    test_sets: Mapping[str, TokenizedDataset],
    config: FederationConfig,
    settings: TrainSettings,
    options: SplitOptions,
    max_length: int,
    observer: Observer | None = None,
) -> tuple[Federation, SplitTrainer]:
    """A one-process split federation over ``lm`` (the institutions' model; the server gets its
    own copy of the same base and adapter, as it builds one from the same public base)."""
    server_lm = copy.deepcopy(lm)
    client = SplitModel(lm, options.spec)
    middle = MiddleServer(
        SplitModel(server_lm, options.spec),
        MiddleSettings(
            lr=options.server_lr if options.server_lr is not None else settings.lr,
            max_grad_norm=settings.max_grad_norm,
        ),
        observer,
    )
    trainer = SplitTrainer(
        client,
        middle,
        train_sets,
        test_sets,
        pad_id,
        settings,
        config.seed,
        config.schedule(),
        max_length,
        options.noise,
    )
    max_samples = max(len(d) for d in train_sets.values())
    return Federation(
        config, trainer, trainer.evaluate, client.client_vector(), max_samples
    ), trainer

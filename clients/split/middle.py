"""The server's middle blocks: forward and backward for one institution's step at a time.

:class:`MiddleServer` holds the server's copy of the model
(:class:`~clients.split.model.SplitModel`) and trains the LoRA tensors of its blocks. It is the
compute behind both ways of serving steps: the in-process link of ``fedsec simulate --mode
split`` (:mod:`clients.split.trainer`) and the gRPC service of a deployment
(:mod:`server.split_service`), which adds turns, deadlines and streams around it. (It lives
beside the model code in ``clients`` because it *is* model code; the server imports it only when
split training is configured.)

Every step is admitted by the round's :class:`~fl_core.split.SplitRound` before anything is
computed (whose turn, which step, which message) and every tensor is checked against the step's
:class:`~fl_core.split.StepLimits` and for NaN/Inf; a client whose tensor is refused is dropped
from the round. The server's part gets a fresh optimizer at the start of each institution's turn,
as each institution's part gets one each round: the server's state between turns is its LoRA
vector alone, which is what a deployment checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from clients.split.model import SplitModel, tensor_from_wire
from fl_core.split import (
    SplitConfigError,
    SplitRound,
    SplitTensorError,
    StepLimits,
    StepOutOfOrder,
    step_bytes,
)

#: Sees what the server received: (client, step, activation, row lengths). For measurements.
Observer = Callable[[int, int, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class MiddleSettings:
    """How the server trains its part: AdamW (as the clients' default) or SGD."""

    lr: float
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if not self.lr > 0 or not self.max_grad_norm > 0:
            raise SplitConfigError(f"the server's lr and max_grad_norm must be > 0, got {self}")
        if self.optimizer not in ("adamw", "sgd"):
            raise SplitConfigError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")


@dataclass
class Traffic:
    """Payload bytes of the steps served, per institution and direction."""

    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    #: Seconds the server computed for each institution (its forward and backward passes).
    server_s: dict[int, float] = field(default_factory=dict)

    def timed(self, client: int, seconds: float) -> None:
        self.server_s[client] = self.server_s.get(client, 0.0) + seconds

    def add(self, client: int, rows: int, tokens: int, hidden: int) -> None:
        sizes = step_bytes(rows, tokens, hidden)
        self.up[client] = self.up.get(client, 0) + sizes["up"]
        self.down[client] = self.down.get(client, 0) + sizes["down"]
        self.steps[client] = self.steps.get(client, 0) + 1


@dataclass
class _Pending:
    client: int
    step: int
    hidden: torch.Tensor
    output: torch.Tensor


class MiddleServer:
    """The server's part of the model, trained by the institutions' steps in turn."""

    def __init__(
        self, split: SplitModel, settings: MiddleSettings, observer: Observer | None = None
    ) -> None:
        self.split = split
        self.settings = settings
        self.observer = observer
        self.round: SplitRound | None = None
        self.limits: StepLimits | None = None
        self.traffic = Traffic()
        self._optimizer: torch.optim.Optimizer | None = None
        self._turn_of: int | None = None
        self._pending: _Pending | None = None
        self._device = split.lm.runtime.device

    def vector(self) -> np.ndarray:
        return self.split.server_vector()

    def set_vector(self, vector: np.ndarray) -> None:
        self.split.set_server_vector(vector)

    def begin_round(self, order: Sequence[int], steps: int, limits: StepLimits) -> SplitRound:
        """A new round's schedule; any step in flight of the previous one is forgotten."""
        if limits.hidden_size != self.split.hidden_size:
            raise SplitConfigError(
                f"step limits for hidden width {limits.hidden_size}, the model's is "
                f"{self.split.hidden_size}"
            )
        self.round = SplitRound(order, steps)
        self.limits = limits
        self.traffic = Traffic()
        self._optimizer, self._turn_of, self._pending = None, None, None
        return self.round

    def _round(self) -> tuple[SplitRound, StepLimits]:
        if self.round is None or self.limits is None:
            raise StepOutOfOrder("no split round is in progress")
        return self.round, self.limits

    def drop(self, client: int, reason: str) -> None:
        round_ = self.round
        if round_ is None:
            return
        round_.drop(client, reason)
        if self._pending is not None and self._pending.client == client:
            self._pending = None

    def activation(
        self, client: int, step: int, hidden: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """Run the server's blocks on ``client``'s bottom activation of ``step``."""
        round_, limits = self._round()
        round_.activation(client, step)  # refuses out of turn / order before any compute
        try:
            limits.check_activation(hidden.shape, [int(n) for n in lengths])
            received = tensor_from_wire(
                hidden, f"client {client}'s activation of step {step}", self._device
            )
        except SplitTensorError as exc:
            self.drop(client, str(exc))
            raise
        if self.observer is not None:
            self.observer(client, step, hidden, np.asarray(lengths))
        if self._turn_of != client:
            self._turn_of = client
            self._optimizer = self._new_optimizer()
        began = time.perf_counter()
        leaf = received.requires_grad_()
        self.split.lm.model.train()
        # In one process this runs inside the institution's autograd function, where grad mode
        # is off; the server's graph needs it on.
        with torch.enable_grad():
            output = self.split.middle_forward(leaf, [int(n) for n in lengths])
        self._pending = _Pending(client, step, leaf, output)
        rows, tokens, width = hidden.shape
        self.traffic.add(client, rows, tokens, width)
        self.traffic.timed(client, time.perf_counter() - began)
        return output.detach().float().cpu().numpy().copy()

    def gradient(self, client: int, step: int, grad: np.ndarray) -> np.ndarray:
        """Backpropagate ``client``'s gradient at the top cut, update the server's LoRA, and
        return the gradient at the bottom cut."""
        round_, limits = self._round()
        pending = self._pending
        round_.gradient(client, step)
        if pending is None or pending.client != client or pending.step != step:
            raise StepOutOfOrder(f"client {client}: no forward of step {step} is pending")
        self._pending = None
        try:
            limits.check_like(grad.shape, tuple(pending.output.shape))
            received = tensor_from_wire(
                grad, f"client {client}'s gradient of step {step}", self._device
            )
        except SplitTensorError as exc:
            self.drop(client, str(exc))
            raise
        optimizer = self._optimizer
        if optimizer is None:  # an activation always sets it first
            raise StepOutOfOrder(f"client {client}: gradient before any activation")
        began = time.perf_counter()
        params = self.split.server_parameters()
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            pending.output.backward(received.to(pending.output.dtype))  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        optimizer.step()
        back = pending.hidden.grad
        if back is None:
            raise SplitConfigError("no gradient reached the server's input; the cut is wrong")
        self.split.lm.model.eval()
        self.traffic.timed(client, time.perf_counter() - began)
        return back.detach().float().cpu().numpy().copy()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = self.split.server_parameters()
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.settings.lr)
        return torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=0.0)

"""Split learning (FL-GLM style), the parts that need no torch: the cut, who owns which LoRA
tensor, the order in which the server serves steps, and what a step may carry.

The model's decoder blocks ``0 .. L-1`` are cut twice (:class:`SplitSpec`): an institution keeps
the input embedding, the bottom ``k = client_bottom`` blocks, the top ``m = client_top`` blocks,
the final norm and the output head; the server holds blocks ``k .. L-m-1`` (at least one). Raw
tokens and labels never leave the institution. One training step is U-shaped:

1. the client runs the bottom and sends the activation ``h_k`` (batch x length x hidden) and the
   row lengths (right padding) up;
2. the server runs its blocks and returns ``h_{L-m}``;
3. the client runs the top and the loss, backpropagates to ``h_{L-m}`` and sends that gradient
   up;
4. the server backpropagates through its blocks, updates its own LoRA and returns the gradient
   at ``h_k``;
5. the client backpropagates through the bottom and updates its LoRA.

The server trains its part (the LoRA tensors of its blocks, :attr:`SplitLayout.server`) itself,
one copy for the federation; the institutions' parts (:attr:`SplitLayout.client`: the LoRA
tensors of their blocks and of the head) are federated after each round through the same
secure aggregation as LoRA FedAvg, so the server sees their sum only.

Institutions are served **in turn**, in the sorted order of the cohort, each for all its local
steps (:class:`SplitRound`). The server's part is one model, trained in sequence by everyone's
gradients: serving in parallel would need a copy of it per institution and an average on the
server (a second, unprotected aggregation) and, on shared cores, buys no speed. A fixed order
also makes a round deterministic, so a deployment over gRPC reproduces the one-process run. What
the server sees of an institution in a step (its activations and the gradient at the top cut)
is the leak split learning has; :mod:`proofs.attacks.split_activations` measures it.

Numpy only: the server and the wire layer use this module without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fl_core.errors import FLError
from fl_core.updates import DTYPE, LoraLayout

#: Bytes of one float32 coordinate on the wire.
FLOAT_BYTES = 4


class SplitError(FLError):
    """Base class of the split-learning refusals."""


class SplitConfigError(SplitError, ValueError):
    """A cut that cannot work on this model (no server block left, a negative depth, ...)."""


class SplitTensorError(SplitError, ValueError):
    """An activation or gradient whose shape, lengths or values the step does not allow."""


class SplitProtocolError(SplitError):
    """A step message the server does not expect now; the client leaves the round."""


class NotInRound(SplitProtocolError):
    """A client that is not in this round's cohort (or not in split training at all)."""


class NotYourTurn(SplitProtocolError):
    """A step from a client whose turn it is not (another institution is being served)."""


class StepOutOfOrder(SplitProtocolError):
    """A step number or message kind other than the one the server waits for."""


class ClientDropped(SplitProtocolError):
    """A step from a client the server already dropped from this round (a missed deadline)."""


@dataclass(frozen=True)
class SplitSpec:
    """Where the model is cut: ``client_bottom`` blocks at the bottom and ``client_top`` at the
    top stay with the institution (besides the embedding, final norm and head)."""

    client_bottom: int = 1
    client_top: int = 0

    def __post_init__(self) -> None:
        if self.client_bottom < 0 or self.client_top < 0:
            raise SplitConfigError(
                f"client_bottom and client_top count blocks and must be >= 0, got "
                f"{self.client_bottom} and {self.client_top}"
            )

    def check(self, num_layers: int) -> None:
        """Refuse a cut that leaves the server no block of a ``num_layers``-block model."""
        if self.client_bottom + self.client_top >= num_layers:
            raise SplitConfigError(
                f"the model has {num_layers} blocks: keeping {self.client_bottom} at the bottom "
                f"and {self.client_top} at the top on the client leaves the server none; lower "
                "client_bottom or client_top"
            )

    def server_layers(self, num_layers: int) -> range:
        """The blocks the server runs, ``k .. L-m-1``."""
        self.check(num_layers)
        return range(self.client_bottom, num_layers - self.client_top)

    def client_owns(self, layer: int | None, num_layers: int) -> bool:
        """Whether a tensor of block ``layer`` (None: outside every block, e.g. the head) is
        part of the institutions' side."""
        return layer is None or layer not in self.server_layers(num_layers)

    def describe(self, num_layers: int) -> dict[str, object]:
        server = self.server_layers(num_layers)
        return {
            "client_bottom": self.client_bottom,
            "client_top": self.client_top,
            "layers": num_layers,
            "server_blocks": [server.start, server.stop - 1],
            "schedule": "in turn: sorted cohort order, each institution's steps before the next",
        }


#: What the server of a split run receives beyond the secure sums (run.json's ``split``).
WHAT_THE_SERVER_SEES = (
    "every step's activations entering its first block and the loss gradient at the top cut, "
    "of every institution (TLS-protected in transit, covered neither by secure aggregation nor "
    "by DP)"
)


def noise_phrase(noise: float | None) -> str:
    """run.json's ``split.activation_noise`` as a report says it. ``None``: a deployment, where
    each institution sets its own (client.toml ``[split] activation_noise``) and the server is
    not told it."""
    if noise is None:
        return (
            "with the activation noise each institution sets for itself (client.toml [split] "
            "activation_noise), which the server is not told"
        )
    return f"with activation noise of ratio {noise:g}" if noise else "without activation noise"


def layer_index(name: str, layers_prefix: str) -> int | None:
    """The block index of the tensor ``name`` whose blocks live under ``layers_prefix`` (for
    example ``base_model.model.model.layers``), or None for a tensor outside every block."""
    head = layers_prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    if not index.isdigit():
        raise SplitConfigError(f"{name}: no block index after {layers_prefix!r}")
    return int(index)


@dataclass(frozen=True)
class SplitLayout:
    """The trainable LoRA layout cut in two: the institutions' part and the server's part."""

    full: LoraLayout
    client: LoraLayout
    server: LoraLayout

    @classmethod
    def partition(
        cls, layout: LoraLayout, layers_prefix: str, spec: SplitSpec, num_layers: int
    ) -> SplitLayout:
        spec.check(num_layers)
        layer_of = {name: layer_index(name, layers_prefix) for name in layout.names}
        for name, layer in layer_of.items():
            if layer is not None and layer >= num_layers:
                raise SplitConfigError(f"{name}: block {layer} of a {num_layers}-block model")

        client = layout.select(lambda n: spec.client_owns(layer_of[n], num_layers))
        server = layout.select(lambda n: not spec.client_owns(layer_of[n], num_layers))
        if not client.entries:
            raise SplitConfigError(
                "no trainable LoRA tensor is on the institutions' side of the cut: adapt the head "
                "or keep a block on the client (client_bottom / client_top)"
            )
        if not server.entries:
            raise SplitConfigError(
                "no trainable LoRA tensor is in the server's blocks: the LoRA targets miss them"
            )
        return cls(layout, client, server)

    def join(self, client: np.ndarray, server: np.ndarray) -> np.ndarray:
        """The full trainable vector from the two parts (each in its own layout)."""
        tensors = self.client.unflatten(client.astype(DTYPE, copy=False))
        tensors.update(self.server.unflatten(server.astype(DTYPE, copy=False)))
        return self.full.flatten(tensors)

    def split(self, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of :meth:`join`: (client part, server part)."""
        tensors = self.full.unflatten(full.astype(DTYPE, copy=False))
        return (
            self.client.flatten({n: tensors[n] for n in self.client.names}),
            self.server.flatten({n: tensors[n] for n in self.server.names}),
        )


@dataclass(frozen=True)
class StepLimits:
    """What one step's tensors may be: batch rows, tokens per row, hidden width."""

    batch_size: int
    max_length: int
    hidden_size: int

    def __post_init__(self) -> None:
        if min(self.batch_size, self.max_length, self.hidden_size) < 1:
            raise SplitConfigError(f"step limits must be positive, got {self}")

    @property
    def max_bytes(self) -> int:
        """The largest tensor a step carries, in bytes: checked before any allocation."""
        return FLOAT_BYTES * self.batch_size * self.max_length * self.hidden_size

    def check_activation(self, shape: Sequence[int], lengths: Sequence[int]) -> None:
        """An activation going up: (rows, width, hidden), one length per row, right padding."""
        self._check_shape(shape)
        rows, width = shape[0], shape[1]
        if len(lengths) != rows:
            raise SplitTensorError(f"{len(lengths)} row lengths for {rows} rows")
        if any(n < 1 or n > width for n in lengths):
            raise SplitTensorError(f"row lengths must lie in [1, {width}], got {list(lengths)}")
        if max(lengths) != width:
            raise SplitTensorError(
                f"the longest row has {max(lengths)} tokens but the tensor is {width} wide "
                "(rows are padded only to the longest)"
            )

    def check_like(self, shape: Sequence[int], expected: Sequence[int]) -> None:
        """A gradient or output: exactly the shape of the activation of the same step."""
        self._check_shape(shape)
        if tuple(shape) != tuple(expected):
            raise SplitTensorError(
                f"tensor of shape {tuple(shape)}, the step has {tuple(expected)}"
            )

    def _check_shape(self, shape: Sequence[int]) -> None:
        if len(shape) != 3:
            raise SplitTensorError(f"need a (rows, tokens, hidden) tensor, got shape {shape}")
        rows, width, hidden = shape
        if not 1 <= rows <= self.batch_size:
            raise SplitTensorError(f"{rows} rows, a step carries 1 to {self.batch_size}")
        if not 1 <= width <= self.max_length:
            raise SplitTensorError(f"{width} tokens per row, a step carries 1 to {self.max_length}")
        if hidden != self.hidden_size:
            raise SplitTensorError(f"hidden width {hidden}, the model's is {self.hidden_size}")


def check_tensor_values(array: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf in a step tensor: it would poison the other side's model."""
    if not np.all(np.isfinite(array)):
        raise SplitTensorError(f"{what} has NaN/Inf entries")


def step_bytes(rows: int, tokens: int, hidden: int) -> dict[str, int]:
    """Payload bytes of one step each way (U-shaped: two tensors up, two down)."""
    tensor = FLOAT_BYTES * rows * tokens * hidden
    return {"up": 2 * tensor + FLOAT_BYTES * rows, "down": 2 * tensor}


class Phase(Enum):
    WAITING = "waiting"  # its turn has not come
    ACTIVATION = "activation"  # the server waits for this step's bottom activation
    GRADIENT = "gradient"  # the server waits for this step's gradient at the top cut
    FINISHED = "finished"
    DROPPED = "dropped"


@dataclass(frozen=True)
class Expected:
    """What the server waits for next: from whom, which step, which message."""

    client: int
    step: int
    phase: Phase


class SplitRound:
    """The server's schedule of one round's split steps: a sans-IO state machine.

    ``order`` is the sorted cohort; each client runs ``steps`` steps (activation, then gradient)
    before the next client's turn begins. The I/O layer (the in-process link, the gRPC service)
    asks :meth:`activation` / :meth:`gradient` before computing anything, and :meth:`drop` when a
    client misses a deadline or disconnects; every refusal is a :class:`SplitProtocolError`.
    """

    def __init__(self, order: Sequence[int], steps: int) -> None:
        if list(order) != sorted(set(order)) or not order:
            raise SplitConfigError(f"the turn order must be the sorted cohort, got {list(order)}")
        if steps < 1:
            raise SplitConfigError(f"each client needs at least one step, got {steps}")
        self.order = tuple(order)
        self.steps = steps
        self._turn = 0
        self._step = 0
        self._phase = Phase.ACTIVATION
        self._finished: list[int] = []
        self._dropped: dict[int, str] = {}

    @property
    def current(self) -> int | None:
        """Whose turn it is (None once every client finished or was dropped)."""
        return self.order[self._turn] if self._turn < len(self.order) else None

    @property
    def done(self) -> bool:
        return self.current is None

    @property
    def finished(self) -> tuple[int, ...]:
        return tuple(self._finished)

    @property
    def dropped(self) -> dict[int, str]:
        return dict(self._dropped)

    def expected(self) -> Expected | None:
        current = self.current
        return None if current is None else Expected(current, self._step, self._phase)

    def phase_of(self, client: int) -> Phase:
        if client not in self.order:
            raise NotInRound(f"client {client} is not in this round's cohort {list(self.order)}")
        if client in self._dropped:
            return Phase.DROPPED
        if client in self._finished:
            return Phase.FINISHED
        return self._phase if client == self.current else Phase.WAITING

    def _expect(self, client: int, step: int, phase: Phase) -> None:
        state = self.phase_of(client)
        if state is Phase.DROPPED:
            raise ClientDropped(
                f"client {client} was dropped from this round: {self._dropped[client]}"
            )
        if state is Phase.FINISHED:
            raise StepOutOfOrder(f"client {client} already ran its {self.steps} steps")
        if state is Phase.WAITING:
            raise NotYourTurn(f"client {client}: it is client {self.current}'s turn")
        if step != self._step or phase is not self._phase:
            raise StepOutOfOrder(
                f"client {client} sent the {phase.value} of step {step}; the server waits for "
                f"the {self._phase.value} of step {self._step}"
            )

    def activation(self, client: int, step: int) -> None:
        """Accept ``client``'s bottom activation of ``step`` (the server then runs forward)."""
        self._expect(client, step, Phase.ACTIVATION)
        self._phase = Phase.GRADIENT

    def gradient(self, client: int, step: int) -> bool:
        """Accept the gradient at the top cut; True when that was the client's last step."""
        self._expect(client, step, Phase.GRADIENT)
        if step + 1 < self.steps:
            self._step, self._phase = step + 1, Phase.ACTIVATION
            return False
        self._finished.append(client)
        self._next_turn()
        return True

    def drop(self, client: int, reason: str) -> None:
        """Take ``client`` out of the round (a missed deadline, a lost connection, a refused
        tensor); its turn, if it was its turn, passes to the next client."""
        state = self.phase_of(client)
        if state in (Phase.DROPPED, Phase.FINISHED):
            return
        self._dropped[client] = reason
        if client == self.current:
            self._next_turn()

    def _next_turn(self) -> None:
        self._turn += 1
        while self._turn < len(self.order) and self.order[self._turn] in self._dropped:
            self._turn += 1
        self._step, self._phase = 0, Phase.ACTIVATION

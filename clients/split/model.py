"""The model cut: one causal LM with LoRA, run as the institution's two ends or the server's middle.

Both parties build the same :class:`clients.trainer.LoraModel` (same public base, same adapter
seed) and run it through transformers' own forward, with the blocks the *other* party runs
swapped out for the duration of one call (:func:`blocks_replaced`):

* the institution (:meth:`SplitModel.client_loss`) replaces block ``k`` by a relay that sends the
  activation entering it to the server and returns what the server's blocks made of it, and
  blocks ``k+1 .. L-m-1`` by pass-throughs; embedding, bottom and top blocks, norm and head run as
  usual. The relay is a :class:`torch.autograd.Function`, so the institution's ``backward()``
  sends the gradient at the top cut to the server and continues with the gradient the server
  returns for the bottom cut;
* the server (:meth:`SplitModel.middle_forward`) runs the base transformer (no head) with blocks
  ``0 .. k-1`` and ``L-m .. L-1`` as pass-throughs; block ``k`` ignores the hidden state it is
  handed (computed from placeholder ids) and takes the received activation instead, and the
  output of block ``L-m-1`` is kept.

Running transformers' own forward on both sides means the attention mask, rotary or learned
positions and every architecture's quirks are computed by the library exactly as in the unsplit
model, so a split step equals a step of the whole model (tests/clients/split/test_split_model.py
checks logits and LoRA gradients). Blocks must map a hidden-state tensor to a tensor of the same
shape (transformers >= 5); the blocks are found as the model's ``ModuleList`` of
``config.num_hidden_layers`` modules (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, OPT, ...).

Rows are right-padded (as :mod:`clients.trainer` pads them) and travel with their lengths; the
server rebuilds the padding mask from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from clients.devices import autocast
from clients.trainer import LoraModel
from fl_core.split import (
    SplitConfigError,
    SplitLayout,
    SplitSpec,
    SplitTensorError,
    StepLimits,
    check_tensor_values,
)
from fl_core.updates import DTYPE
from secagg.dp.noise import CsprngWords


class MiddleLink(Protocol):
    """How an institution reaches the server's blocks (in one process, or over gRPC)."""

    def forward(self, step: int, hidden: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Send the bottom activation of ``step``; returns the activation at the top cut."""
        ...

    def backward(self, step: int, grad: np.ndarray) -> np.ndarray:
        """Send the gradient at the top cut; returns the gradient at the bottom cut."""
        ...


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the list of a causal LM's decoder blocks."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise SplitConfigError("the model has no config.num_hidden_layers; cannot find its blocks")
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == count
            and len({type(block) for block in module}) == 1
        ):
            return name, module
    raise SplitConfigError(
        f"no list of {count} decoder blocks in {type(model).__name__}; split learning needs a "
        "decoder-only model whose blocks form one ModuleList"
    )


@contextlib.contextmanager
def blocks_replaced(blocks: nn.ModuleList, replacements: Mapping[int, nn.Module]) -> Iterator[None]:
    """Swap some blocks for the duration of a call and always put the originals back."""
    originals = {i: blocks[i] for i in replacements}
    try:
        for i, module in replacements.items():
            blocks[i] = module
        yield
    finally:
        for i, module in originals.items():
            blocks[i] = module


class _Skip(nn.Module):
    """A block the other party runs: the hidden state passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Relay(nn.Module):
    """The institution's stand-in for the server's blocks (sits at block ``k``)."""

    def __init__(self, bridge: _Bridge) -> None:
        super().__init__()
        self.bridge = bridge

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not hidden_states.requires_grad:
            # k = 0: the activation is a frozen embedding's output. The server's blocks still
            # need their backward, which autograd runs only through a tensor that requires grad.
            hidden_states = hidden_states.detach().requires_grad_()
        out = _RemoteMiddle.apply(hidden_states, self.bridge)  # type: ignore[no-untyped-call]
        return cast(torch.Tensor, out)


class _ServerBlock(nn.Module):
    """Block ``k`` and/or ``L-m-1`` on the server: takes the received activation, keeps the
    output of the last server block."""

    def __init__(self, block: nn.Module, inject: torch.Tensor | None, capture: bool) -> None:
        super().__init__()
        self.block = block
        self.inject = inject
        self.capture = capture
        self.captured: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inject is not None:
            hidden_states = self.inject
        out = cast(torch.Tensor, self.block(hidden_states, *args, **kwargs))
        if self.capture:
            self.captured = out
        return out


class _Capture(nn.Module):
    """Keeps the hidden state entering a block and passes it through (the attacker's bottom)."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.captured = hidden_states
        return hidden_states


class _Bridge:
    """One step's connection to the server, as the relay's autograd function uses it."""

    def __init__(self, link: MiddleLink, step: int, lengths: np.ndarray, noise: float) -> None:
        self.link = link
        self.step = step
        self.lengths = lengths
        self.noise = noise
        #: What the server received (the activation plus this institution's noise).
        self.sent: np.ndarray | None = None


class _RemoteMiddle(torch.autograd.Function):
    """Forward: send the activation, return the server's output. Backward: send the gradient at
    the top cut, return the server's gradient at the bottom cut (the noise is additive, so the
    gradient with respect to the clean activation is the same)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, bridge: _Bridge) -> torch.Tensor:
        sent = hidden.detach().to(torch.float32).cpu().numpy().astype(DTYPE, copy=True)
        if bridge.noise > 0:
            sent += activation_noise(sent, bridge.noise)
        bridge.sent = sent
        out = bridge.link.forward(bridge.step, sent, bridge.lengths)
        ctx.bridge = bridge
        ctx.like = hidden
        if out.shape != sent.shape:
            raise SplitTensorError(f"server returned shape {out.shape}, sent {sent.shape}")
        return torch.from_numpy(np.array(out, dtype=DTYPE)).to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        bridge: _Bridge = ctx.bridge
        grad = grads[0].detach().to(torch.float32).cpu().numpy().astype(DTYPE, copy=True)
        back = bridge.link.backward(bridge.step, grad)
        if back.shape != grad.shape:
            raise SplitTensorError(f"server returned a gradient of shape {back.shape}")
        like: torch.Tensor = ctx.like
        return torch.from_numpy(np.array(back, dtype=DTYPE)).to(like.device, like.dtype), None


def activation_noise(activation: np.ndarray, ratio: float) -> np.ndarray:
    """Gaussian noise whose standard deviation is ``ratio`` times the root mean square of each
    position's activation vector; drawn from the OS CSPRNG (AES-CTR keyed by ``os.urandom``,
    Box-Muller), so the server cannot predict and subtract it."""
    rms = np.sqrt(np.mean(activation.astype(np.float64) ** 2, axis=-1, keepdims=True))
    words = CsprngWords()
    size = activation.size
    u1 = 1.0 - words.unit_floats(size)  # (0, 1]: the log is finite
    u2 = words.unit_floats(size)
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    noise: np.ndarray = (ratio * rms * normal.reshape(activation.shape)).astype(DTYPE)
    return noise


def pad_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """The 0/1 attention mask of right-padded rows of the given lengths."""
    return (torch.arange(width)[None, :] < torch.as_tensor(list(lengths))[:, None]).long()


class SplitModel:
    """A :class:`LoraModel` and where it is cut: both parties' view of the same adapter."""

    def __init__(self, lm: LoraModel, spec: SplitSpec) -> None:
        if lm.runtime.needs_grad_scaler:
            raise SplitConfigError(
                "split training does not scale fp16 gradients across the cut; use bf16 or fp32"
            )
        self.lm = lm
        self.spec = spec
        self.layers_prefix, self.blocks = decoder_blocks(lm.model)
        self.num_layers = len(self.blocks)
        self.layout = SplitLayout.partition(lm.layout, self.layers_prefix, spec, self.num_layers)
        hidden = getattr(lm.model.config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise SplitConfigError("the model config has no hidden_size")
        self.hidden_size = hidden
        params = dict(zip(lm.layout.names, lm.trainable_parameters(), strict=True))
        self._client_params = [params[n] for n in self.layout.client.names]
        self._server_params = [params[n] for n in self.layout.server.names]
        server = spec.server_layers(self.num_layers)
        self._first, self._last = server.start, server.stop - 1

    def limits(self, batch_size: int, max_length: int) -> StepLimits:
        return StepLimits(batch_size, max_length, self.hidden_size)

    # --- the two parts as vectors -----------------------------------------------------------

    def client_parameters(self) -> list[nn.Parameter]:
        return list(self._client_params)

    def server_parameters(self) -> list[nn.Parameter]:
        return list(self._server_params)

    def full_vector(self) -> np.ndarray:
        return self.lm.get_vector()

    def client_vector(self) -> np.ndarray:
        return self.layout.split(self.lm.get_vector())[0]

    def server_vector(self) -> np.ndarray:
        return self.layout.split(self.lm.get_vector())[1]

    def set_client_vector(self, vector: np.ndarray) -> None:
        self._set(self.layout.client.unflatten(vector.astype(DTYPE, copy=False)))

    def set_server_vector(self, vector: np.ndarray) -> None:
        self._set(self.layout.server.unflatten(vector.astype(DTYPE, copy=False)))

    def _set(self, tensors: Mapping[str, np.ndarray]) -> None:
        params = dict(zip(self.lm.layout.names, self.lm.trainable_parameters(), strict=True))
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(torch.from_numpy(value))

    # --- the institution's side -------------------------------------------------------------

    def client_logits(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        link: MiddleLink,
        step: int,
        noise: float = 0.0,
    ) -> tuple[torch.Tensor, _Bridge]:
        """Logits of the whole model, the middle computed by the server behind ``link``."""
        lengths = mask.sum(dim=1).cpu().numpy().astype(np.int64)
        bridge = _Bridge(link, step, lengths, noise)
        replacements: dict[int, nn.Module] = {self._first: _Relay(bridge)}
        replacements.update({i: _Skip() for i in range(self._first + 1, self._last + 1)})
        with blocks_replaced(self.blocks, replacements), autocast(self.lm.runtime):
            logits = self.lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return cast(torch.Tensor, logits), bridge

    def bottom_activation(
        self,
        mask: torch.Tensor,
        ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The activation the institution sends for ``ids`` (or input embeddings ``embeds``):
        the hidden state entering block ``k``, with autograd (what an attacker who holds this
        model's bottom computes; no noise)."""
        capture = _Capture()
        replacements: dict[int, nn.Module] = {self._first: capture}
        replacements.update({i: _Skip() for i in range(self._first + 1, self.num_layers)})
        transformer = cast(nn.Module, self.lm.model.get_base_model().base_model)
        with blocks_replaced(self.blocks, replacements):
            transformer(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        if capture.captured is None:
            raise SplitConfigError("block k never ran; the model skips blocks")
        return capture.captured

    # --- the server's side ------------------------------------------------------------------

    def middle_forward(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The server's blocks applied to a received activation (a leaf that requires grad)."""
        rows, width, _ = hidden.shape
        device = hidden.device
        placeholder = torch.zeros((rows, width), dtype=torch.long, device=device)
        entry = _ServerBlock(self.blocks[self._first], hidden, self._first == self._last)
        replacements: dict[int, nn.Module] = {i: _Skip() for i in range(self._first)}
        replacements[self._first] = entry
        exit_block = entry
        if self._last != self._first:
            exit_block = _ServerBlock(self.blocks[self._last], None, True)
            replacements[self._last] = exit_block
        replacements.update({i: _Skip() for i in range(self._last + 1, self.num_layers)})
        transformer = cast(nn.Module, self.lm.model.get_base_model().base_model)
        mask = pad_mask(lengths, width).to(device)
        with blocks_replaced(self.blocks, replacements), autocast(self.lm.runtime):
            transformer(input_ids=placeholder, attention_mask=mask, use_cache=False)
        if exit_block.captured is None:
            raise SplitConfigError("the server's last block never ran; the model skips blocks")
        return exit_block.captured


def tensor_from_wire(array: np.ndarray, what: str, device: torch.device) -> torch.Tensor:
    """A received step tensor as float32 torch on ``device``, refusing NaN/Inf."""
    check_tensor_values(array, what)
    return torch.from_numpy(np.array(array, dtype=DTYPE)).to(device)

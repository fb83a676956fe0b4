"""Local LoRA training of a causal LM: one loop a reader can follow (nanoGPT style).

A :class:`LoraModel` wraps a base model with a PEFT LoRA adapter whose initial weights depend
only on ``LoraSettings.init_seed``, so every client and the server build the same starting
adapter. In FFA-LoRA mode (Sun et al., ICLR'24) the A matrices stay frozen at that shared
initialisation and only B is trained: the average of the B updates is then exactly the update
of the averaged product BA, which is what secure aggregation can compute. In plain mode A and B
are both trained and averaged separately (as FedIT/OpenFedLLM do), which is inexact.

:func:`train_local` starts from the global vector, trains, and returns the update
``trained - global`` over the trainable tensors only, with the FedProx proximal term and the
SCAFFOLD correction (option II of Karimireddy et al., ICML'20) when asked. An update with NaN or
Inf is refused with :class:`~fl_core.errors.NonFiniteUpdateError` and never returned.

Which modules are adapted is resolved per architecture by :mod:`clients.lora_targets`; where
the model runs (device, autocast precision, 4-bit base) by :mod:`clients.devices`. The LoRA
tensors themselves stay float32 on every device, so the vectors that leave a client do too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from clients.data import IGNORE_INDEX, TokenizedDataset
from clients.devices import CPU, Runtime, autocast
from clients.lora_targets import (
    HeadPolicy,
    LoraTargetError,
    TargetPlan,
    adapted_modules,
    plan_targets,
    untie_head,
)
from fl_core.adapter_io import AdapterConfig
from fl_core.errors import FLError, NonFiniteUpdateError, UpdateLayoutError
from fl_core.recipe import ALL_LINEAR, Recipe
from fl_core.updates import LoraLayout, check_finite

LoraMode = Literal["plain", "ffa"]
_ADAPTER = "default"


class TrainingConfigError(FLError, ValueError):
    """Training settings that cannot work (no steps, SCAFFOLD without SGD, ...)."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape. ``targets``/``head``: see :func:`clients.lora_targets.plan_targets`
    (the default adapts every linear layer, and the output head when it is untied, as on the
    embedded tiny Llama, whose random head is what lets it learn a domain quickly)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    head: HeadPolicy = "auto"
    mode: LoraMode = "plain"
    init_seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: Recipe, init_seed: int) -> LoraSettings:
        return cls(
            recipe.lora_rank,
            recipe.lora_alpha,
            recipe.lora_dropout,
            recipe.lora_targets,
            recipe.lora_head,
            recipe.lora_mode,
            init_seed,
        )


@dataclass(frozen=True)
class TrainSettings:
    """Exactly one of ``local_steps`` / ``local_epochs`` sets how long a client trains.

    ``seed`` keys the client's data order (and LoRA dropout); ``data_offset`` is the number of
    batches it already drew from that order in earlier rounds. A client that keeps its seed and
    passes its running batch count walks its data epoch by epoch across rounds, each example
    once per epoch, as pooled training does; a fresh seed every round instead draws the first
    batches of a new permutation each time, which with few local steps revisits some examples
    and skips others.
    """

    local_steps: int | None = 20
    local_epochs: int | None = None
    batch_size: int = 16
    lr: float = 3e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    seed: int = 0
    prox_mu: float = 0.0
    max_grad_norm: float = 1.0
    num_threads: int | None = 2
    data_offset: int = 0
    #: Micro-batches per batch: the same update (the loss is normalised over the whole batch's
    #: response tokens) with 1/grad_accum of the activation memory.
    grad_accum: int = 1

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        lr: float,
        seed: int,
        data_offset: int = 0,
        prox_mu: float = 0.0,
        optimizer: Literal["adamw", "sgd"] | None = None,
    ) -> TrainSettings:
        """One round's settings: the recipe plus what the round decides (its scheduled lr, the
        client's data position, the strategy's proximal term and optimizer)."""
        return cls(
            local_steps=recipe.local_steps,
            local_epochs=recipe.local_epochs,
            batch_size=recipe.batch_size,
            lr=lr,
            optimizer=optimizer or recipe.optimizer,
            seed=seed,
            prox_mu=prox_mu,
            max_grad_norm=recipe.max_grad_norm,
            num_threads=recipe.threads,
            data_offset=data_offset,
            grad_accum=recipe.grad_accum,
        )

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise TrainingConfigError("set exactly one of local_steps and local_epochs")
        if (self.local_steps or self.local_epochs or 0) < 1:
            raise TrainingConfigError("local_steps / local_epochs must be >= 1")
        if self.batch_size < 1 or not self.lr > 0 or self.prox_mu < 0:
            raise TrainingConfigError("need batch_size >= 1, lr > 0 and prox_mu >= 0")
        if self.data_offset < 0:
            raise TrainingConfigError(f"data_offset must be >= 0, got {self.data_offset}")
        if not 1 <= self.grad_accum <= self.batch_size:
            raise TrainingConfigError(
                f"grad_accum must be in [1, batch_size={self.batch_size}], got {self.grad_accum}"
            )


@dataclass(frozen=True)
class ScaffoldControls:
    """Server control variate c and this client's c_i, both over the trainable layout."""

    server: np.ndarray
    client: np.ndarray


@dataclass(frozen=True)
class LocalResult:
    delta: np.ndarray  # trained - global, float32, over the trainable layout
    num_samples: int
    mean_loss: float
    steps: int
    control_delta: np.ndarray | None = None  # SCAFFOLD: c_i^+ - c_i
    new_client_control: np.ndarray | None = None  # SCAFFOLD: c_i^+, kept by the client


class LoraModel:
    """A base causal LM with one LoRA adapter, read and written as flat vectors."""

    def __init__(
        self, base: PreTrainedModel, settings: LoraSettings, runtime: Runtime = CPU
    ) -> None:
        self.plan: TargetPlan = plan_targets(base, settings.targets, settings.head)
        if self.plan.untie_head:
            untie_head(base)
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(self.plan.targets),
            bias="none",
            task_type="CAUSAL_LM",
            fan_in_fan_out=self.plan.fan_in_fan_out,
        )
        # Seeding here is what makes A identical on every client and the server (FFA-LoRA
        # depends on it); the caller's RNG state is left untouched.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # PEFT asks transformers a deprecated question while wrapping; not ours to fix.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            torch.manual_seed(settings.init_seed)
            self.model = get_peft_model(base, config)
        adapted = adapted_modules(self.model)
        if adapted != self.plan.modules:
            raise LoraTargetError(
                f"PEFT adapted {len(adapted)} modules where {len(self.plan.modules)} were planned"
            )
        self.settings = settings
        self.runtime = runtime
        self.peft_config = config
        self._params: dict[str, torch.nn.Parameter] = {}
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                # PEFT's on-disk keys are the parameter names without the adapter name.
                self._params[name.replace(f".{_ADAPTER}.", ".")] = param
        if any(p.device.type != "cpu" for p in self._params.values()):
            # A base already on a GPU (QLoRA) drew A from that device's RNG: draw it again on
            # the CPU so that every party, whatever its device, starts from the same adapter.
            self._seeded_init(settings.init_seed)
        if settings.mode == "ffa":
            for key, param in self._params.items():
                if ".lora_A." in key:
                    param.requires_grad_(False)
        if runtime.quantization == "none":
            self.model.to(runtime.device)
        self.full_layout = LoraLayout.from_tensors(self.tensors())
        self.layout = self.full_layout.select(lambda k: self._params[k].requires_grad)

    def _seeded_init(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key in sorted(self._params):
                param = self._params[key]
                value = torch.zeros(param.shape, dtype=torch.float32)
                if ".lora_A." in key:
                    bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform(a=sqrt(5))
                    value.uniform_(-bound, bound, generator=generator)
                param.copy_(value)

    def describe(self) -> dict[str, object]:
        """What was adapted, for ``run.json`` and the report."""
        trainable = sum(int(self._params[k].numel()) for k in self.layout.names)
        return {
            "targets": list(self.plan.targets),
            "modules": self.plan.leaf_counts(),
            "module_paths": list(self.plan.modules),
            "head": self.plan.head,
            "head_tied_in_base": self.plan.head_tied,
            "head_untied": self.plan.untie_head,
            "lora_parameters": sum(int(p.numel()) for p in self._params.values()),
            "trainable_parameters": trainable,
            "base_parameters": sum(
                int(p.numel()) for n, p in self.model.named_parameters() if "lora_" not in n
            ),
        }

    def adapter_config(self, base_model_name_or_path: str | None = None) -> AdapterConfig:
        s = self.settings
        return AdapterConfig(
            s.rank,
            s.alpha,
            tuple(sorted(self.plan.targets)),
            s.dropout,
            base_model_name_or_path,
            self.plan.fan_in_fan_out,
        )

    def tensors(self) -> dict[str, np.ndarray]:
        """All LoRA tensors (A and B), as PEFT names them in ``adapter_model.safetensors``."""
        return {k: p.detach().float().cpu().numpy().copy() for k, p in self._params.items()}

    def get_vector(self) -> np.ndarray:
        """The trainable tensors as one vector in the layout's order."""
        return self.layout.flatten(
            {k: self._params[k].detach().float().cpu().numpy() for k in self.layout.names}
        )

    def set_vector(self, vector: np.ndarray) -> None:
        for name, value in self.layout.unflatten(vector).items():
            with torch.no_grad():
                self._params[name].copy_(torch.from_numpy(value))

    def set_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load a full adapter (e.g. the server's frozen A in FFA mode) by name."""
        self.full_layout.flatten(tensors)  # validates names, shapes and dtype
        with torch.no_grad():
            for name, value in tensors.items():
                self._params[name].copy_(torch.from_numpy(value))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self._params[k] for k in self.layout.names]


def batch_indices(
    size: int, batch_size: int, seed: int, first: int, count: int
) -> list[np.ndarray]:
    """Example indices of batches ``first .. first + count - 1`` of a data order in which epoch e
    is a permutation seeded by (seed, e), cut into ceil(size / batch_size) batches (the last
    may be short). Data order only: nothing secret comes from this generator."""
    per_epoch = math.ceil(size / batch_size)
    out: list[np.ndarray] = []
    epoch, order = -1, np.empty(0, dtype=np.int64)
    for position in range(first, first + count):
        at_epoch, within = divmod(position, per_epoch)
        if at_epoch != epoch:
            epoch, order = at_epoch, np.random.default_rng([seed, at_epoch]).permutation(size)
        out.append(order[within * batch_size : (within + 1) * batch_size])
    return out


def _batches(
    data: TokenizedDataset, order: np.ndarray, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    width = max(len(data.input_ids[i]) for i in order)
    ids = np.full((len(order), width), pad_id, dtype=np.int64)
    labels = np.full((len(order), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(order), width), dtype=np.int64)
    for row, i in enumerate(order):
        n = len(data.input_ids[i])
        ids[row, :n], labels[row, :n], mask[row, :n] = data.input_ids[i], data.labels[i], 1
    return tuple(torch.from_numpy(a).to(device) for a in (ids, labels, mask))


def _response_tokens(data: TokenizedDataset, order: np.ndarray) -> int:
    """Tokens the loss is taken on (labels after the shift, not ignored)."""
    return sum(int((data.labels[i][1:] != IGNORE_INDEX).sum()) for i in order)


def _token_losses(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over response tokens, and their count."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((target != IGNORE_INDEX).sum())


def train_local(
    lm: LoraModel,
    global_vector: np.ndarray,
    data: TokenizedDataset,
    settings: TrainSettings,
    pad_id: int,
    scaffold: ScaffoldControls | None = None,
) -> LocalResult:
    """Train from ``global_vector`` on ``data`` and return the update (never NaN/Inf)."""
    if scaffold is not None:
        if settings.optimizer != "sgd":
            # Option II estimates the mean gradient as (x - y_i) / (K * lr), true only for SGD.
            raise TrainingConfigError("SCAFFOLD's control-variate update needs optimizer='sgd'")
        for what, c in (("server", scaffold.server), ("client", scaffold.client)):
            if c.shape != (lm.layout.size,):
                raise UpdateLayoutError(
                    f"SCAFFOLD {what} control has shape {c.shape}, need ({lm.layout.size},)"
                )
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    check_finite(global_vector, "global model")
    lm.set_vector(global_vector)
    params = lm.trainable_parameters()
    anchors = [p.detach().clone() for p in params]  # global weights for the FedProx term
    correction: list[torch.Tensor] = []
    if scaffold is not None:
        diff = lm.layout.unflatten((scaffold.server - scaffold.client).astype(np.float32))
        correction = [torch.from_numpy(diff[k]) for k in lm.layout.names]
    if settings.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=settings.lr)
    else:
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    runtime = lm.runtime
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler else None
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = settings.local_steps or (settings.local_epochs or 0) * steps_per_epoch
    batches = batch_indices(
        len(data), settings.batch_size, settings.seed, settings.data_offset, total
    )
    losses: list[float] = []
    lm.model.train()
    with torch.random.fork_rng(devices=[]):
        # LoRA dropout: keyed by the seed and the offset too, so a client that keeps its seed
        # across rounds does not replay the same masks every round.
        torch.manual_seed(
            int(np.random.SeedSequence([settings.seed, settings.data_offset]).generate_state(1)[0])
        )
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            # The loss is the mean over the whole batch's response tokens, so splitting the
            # batch into micro-batches changes the memory, not the update.
            count = max(_response_tokens(data, batch), 1)
            batch_loss = 0.0
            micros = np.array_split(batch, min(settings.grad_accum, len(batch)))
            for index, micro in enumerate(micros):
                ids, labels, mask = _batches(data, micro, pad_id, runtime.device)
                with autocast(runtime):
                    loss_sum, _ = _token_losses(lm.model, ids, labels, mask)
                objective = loss_sum / count
                batch_loss += float(objective.detach())
                if settings.prox_mu > 0 and index == 0:  # once per optimizer step
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    objective = objective + 0.5 * settings.prox_mu * prox
                if scaler is not None:
                    scaler.scale(objective).backward()  # type: ignore[no-untyped-call]
                else:
                    objective.backward()  # type: ignore[no-untyped-call]
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            for p, corr in zip(params, correction, strict=False):
                if p.grad is not None:
                    p.grad.add_(corr.to(p.device))  # y <- y - lr * (g - c_i + c)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(batch_loss)
    lm.model.eval()
    delta = lm.get_vector() - global_vector
    mean_loss = float(np.mean(losses))
    if not math.isfinite(mean_loss):
        raise NonFiniteUpdateError(f"training loss became {mean_loss}; refusing to submit")
    check_finite(delta, "local update")
    result = LocalResult(delta.astype(np.float32), len(data), mean_loss, total)
    if scaffold is None:
        return result
    new_control = scaffold.client - scaffold.server - delta / (total * settings.lr)
    new_control = new_control.astype(np.float32)
    control_delta = new_control - scaffold.client
    check_finite(control_delta, "SCAFFOLD control delta")
    return LocalResult(
        result.delta, result.num_samples, mean_loss, total, control_delta, new_control
    )


@torch.no_grad()
def evaluate(
    lm: LoraModel,
    vector: np.ndarray,
    sets: Mapping[str, TokenizedDataset],
    pad_id: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Mean per-token loss on the response tokens of each named held-out set."""
    lm.set_vector(vector)
    lm.model.eval()
    out: dict[str, float] = {}
    for name, data in sets.items():
        total, count = 0.0, 0
        for at in range(0, len(data), batch_size):
            ids, labels, mask = _batches(
                data, np.arange(at, min(at + batch_size, len(data))), pad_id, lm.runtime.device
            )
            with autocast(lm.runtime):
                loss_sum, n = _token_losses(lm.model, ids, labels, mask)
            total, count = total + float(loss_sum), count + n
        out[name] = total / max(count, 1)
    return out

"""Which modules of a causal LM get LoRA adapters, for any architecture transformers builds.

``all-linear`` (the default) is PEFT's shorthand: every ``nn.Linear`` (and GPT-2's ``Conv1D``)
except the output head, i.e. every attention and MLP projection whatever the architecture calls
them (``q_proj``/``o_proj``/``gate_proj`` in Llama, ``c_attn``/``c_fc`` in GPT-2,
``query_key_value``/``dense_h_to_4h`` in GPT-NeoX, ``out_proj``/``fc1`` in OPT).
``peft-default`` is PEFT's own per-architecture list (usually only the query and value
projections). Explicit names must each match a linear module of the model, so an adapter config
never lists a module the model does not have.

The output head is adapted when ``head`` is ``yes`` (or the targets name it), or ``auto`` and
the head is *not* tied to the input embeddings: LoRA on a tied head is a LoRA on the input
embeddings too once merged (``merge_and_unload`` adds B·A to the shared matrix, so the input
lookup changes as well and the merged model's logits differ from the adapted model's). When
asked to adapt a tied head anyway (``head = "yes"``), the head is untied first (it gets its own
copy of the embedding matrix and the config says ``tie_word_embeddings = False``), which keeps
the merge exact; the run records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fl_core.errors import FLError
from fl_core.recipe import ALL_LINEAR, PEFT_DEFAULT

HeadPolicy = Literal["auto", "yes", "no"]
_ADAPTABLE = (torch.nn.Linear, Conv1D)


class LoraTargetError(FLError, ValueError):
    """LoRA target modules that do not exist in, or cannot be adapted on, this model."""


@dataclass(frozen=True)
class TargetPlan:
    """What will be adapted: ``targets`` go to ``LoraConfig.target_modules`` (leaf names when
    they pick out exactly ``modules``, full module paths otherwise)."""

    targets: tuple[str, ...]
    modules: tuple[str, ...]  # full paths of the adapted modules, sorted
    head: str | None  # path of the output head when it is adapted
    head_tied: bool  # the base model ties its head to the input embeddings
    untie_head: bool  # the head must be untied before wrapping (head adapted on a tied model)
    fan_in_fan_out: bool = False  # GPT-2's Conv1D layers store their weight transposed

    def leaf_counts(self) -> dict[str, int]:
        """Adapted modules by leaf name, e.g. ``{"q_proj": 30, "lm_head": 1}``."""
        counts: dict[str, int] = {}
        for path in self.modules:
            leaf = path.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
        return dict(sorted(counts.items()))


def _head(model: PreTrainedModel) -> torch.nn.Module | None:
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    return cast(torch.nn.Module | None, head)


def head_path(model: PreTrainedModel) -> str | None:
    head = _head(model)
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def head_is_tied(model: PreTrainedModel) -> bool:
    """True when the output head and the input embeddings share one weight tensor."""
    head, embeddings = _head(model), model.get_input_embeddings()
    if head is None or embeddings is None:
        return False
    out_w: torch.Tensor = getattr(head, "weight")  # noqa: B009
    in_w: torch.Tensor = getattr(embeddings, "weight")  # noqa: B009
    return out_w is in_w or out_w.data_ptr() == in_w.data_ptr()


def _linear_modules(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(module, _ADAPTABLE)
    }


def _matches(path: str, target: str) -> bool:
    # PEFT's rule for a list of names: the module's full name or a dotted suffix of it.
    return path == target or path.endswith("." + target)


def plan_targets(
    model: PreTrainedModel, targets: Sequence[str], head: HeadPolicy = "auto"
) -> TargetPlan:
    """Resolve ``targets`` (``all-linear``, ``peft-default`` or module names) on ``model``."""
    linear = _linear_modules(model)
    head_name = head_path(model)
    tied = head_is_tied(model)
    body = {name for name in linear if name != head_name}
    if tuple(targets) == (ALL_LINEAR,):
        chosen = set(body)
    else:
        names: Sequence[str]
        if tuple(targets) == (PEFT_DEFAULT,):
            model_type = str(getattr(model.config, "model_type", ""))
            names = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or []
            if not names:
                raise LoraTargetError(
                    f"PEFT has no default LoRA targets for model type {model_type!r}; use "
                    f"lora_targets = {ALL_LINEAR} or name the modules"
                )
        else:
            names = list(targets)
        chosen = set()
        known = sorted({n.rsplit(".", 1)[-1] for n in body})
        for target in names:
            hits = {n for n in linear if _matches(n, target)}
            if not hits:
                raise LoraTargetError(
                    f"lora_targets: no linear module named {target!r} in this "
                    f"{type(model).__name__}; its linear layers are: {', '.join(known)}"
                )
            if head_name is not None and head_name in hits:
                if head == "no":
                    raise LoraTargetError(
                        f"lora_targets names the output head {target!r} but lora_head = no"
                    )
                head = "yes"  # named explicitly: asked for, as with lora_head = yes
                hits.discard(head_name)
            chosen |= hits
    want_head = head == "yes" or (head == "auto" and not tied)
    if want_head and head_name is not None:
        if not isinstance(linear.get(head_name), torch.nn.Linear):
            raise LoraTargetError(f"the output head {head_name!r} is not a linear layer")
        chosen.add(head_name)
    else:
        head_name = None
    if not chosen:
        raise LoraTargetError("no module to adapt")
    modules = tuple(sorted(chosen))
    leaves = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    by_leaf = {m for m in linear if any(_matches(m, leaf) for leaf in leaves)}
    names_out: tuple[str, ...] = leaves if by_leaf == chosen else modules
    conv = any(isinstance(linear[m], Conv1D) for m in modules)
    return TargetPlan(names_out, modules, head_name, tied, tied and head_name is not None, conv)


def untie_head(model: PreTrainedModel) -> None:
    """Give the output head its own copy of the (tied) embedding matrix, keeping the logits."""
    head = _head(model)
    if head is None:
        raise LoraTargetError("this model has no output head to untie")
    weight: torch.Tensor = getattr(head, "weight")  # noqa: B009
    head.weight = torch.nn.Parameter(weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def adapted_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """Paths (in the unwrapped base model's naming) of every module that carries a LoRA layer."""
    out = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            out.append(name.removeprefix("base_model.model."))
    return tuple(sorted(out))

"""What the attacker reads from the public global model, and how updates are addressed.

The server knows the global model it sent out, so every attack may use its weights; it never
sees a client's inputs. Updates are ``{parameter name: float64 array}`` in the names torch gives
them (plain ``model.layers.0.self_attn.q_proj.weight`` or PEFT's
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``).

Architecture support: decoder-only transformers laid out like Llama (Llama, Mistral, Qwen2,
Gemma, ...): ``get_input_embeddings()``, a ``layers`` list whose blocks start with an
``input_layernorm``, and ``q_proj``/``k_proj``/``v_proj`` reading that norm's output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from proofs.attacks.errors import AttackInputError

Array = npt.NDArray[np.float64]
Update = Mapping[str, Array]

#: The projections that read the normed input of a block (the same vector for all three).
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")

_LAYER_TENSOR = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkv]_proj)\."
    r"(?P<kind>weight|lora_A(?:\.[^.]+)?\.weight)$"
)


def to_update(tensors: Mapping[str, torch.Tensor]) -> dict[str, Array]:
    """Detach torch tensors into the float64 arrays the attacks and views work on."""
    return {name: t.detach().to(torch.float64).cpu().numpy() for name, t in tensors.items()}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Llama-like causal LM."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers)
            and hasattr(layers[0], "input_layernorm")
        ):
            return layers
    raise AttackInputError(
        "the model has no Llama-style decoder layers (a 'layers' list whose blocks have an "
        "'input_layernorm'); the span attack needs that architecture"
    )


def input_embedding_matrix(model: nn.Module) -> torch.Tensor:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Embedding):
        raise AttackInputError("the model exposes no input embedding (get_input_embeddings)")
    return embedding.weight.detach()


@torch.no_grad()
def normed_vocabulary(model: nn.Module) -> Array:
    """Every vocabulary embedding after block 0's input norm: what block 0's q/k/v read.

    RMSNorm acts per position, so the input a token produces at block 0 does not depend on its
    position or neighbours (RoPE is applied after the projection).
    """
    norm = cast(nn.Module, decoder_layers(model)[0].input_layernorm)
    out: torch.Tensor = norm(input_embedding_matrix(model).unsqueeze(0))[0]
    return out.to(torch.float64).cpu().numpy()


@torch.no_grad()
def block_inputs(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The normed input of block ``layer`` at every position of ``ids`` (batch, seq, hidden)."""
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden: torch.Tensor = out.hidden_states[layer]
    norm = cast(nn.Module, decoder_layers(model)[layer].input_layernorm)
    normed: torch.Tensor = norm(hidden)
    return normed


def attention_input_rows(update: Update, layer: int, lora: bool) -> Array | None:
    """Rows of every q/k/v tensor of block ``layer`` in the update, stacked (or None if none).

    For a full weight W (out × in) the gradient is Σ_t δ_t x_tᵀ, so its rows lie in the span of
    the block's inputs x_t. For LoRA, ∂L/∂A = s·Bᵀ Σ_t δ_t x_tᵀ: the rows of A's update lie in
    the same span (as long as the local optimiser is SGD-like and LoRA dropout is off), but a
    single A has only r rows, so stacking q, k and v gives up to 3r directions of that span.
    """
    rows = []
    for name, value in update.items():
        match = _LAYER_TENSOR.search(name)
        if match is None or int(match["layer"]) != layer:
            continue
        if (match["kind"] != "weight") == lora:
            if value.ndim != 2:
                raise AttackInputError(f"{name}: expected a matrix, got shape {value.shape}")
            rows.append(np.asarray(value, dtype=np.float64))
    if not rows:
        return None
    widths = {r.shape[1] for r in rows}
    if len(widths) != 1:
        raise AttackInputError(f"block {layer} q/k/v tensors disagree on input width: {widths}")
    return np.concatenate(rows, axis=0)

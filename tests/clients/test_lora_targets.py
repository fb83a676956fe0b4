"""LoRA targets on any causal LM: six tiny random architectures built from configs (no download).

Every attention and MLP projection is adapted whatever the architecture calls it, the adapter
config lists only modules the model has, the output head is adapted only when untied (or when
asked, after untying it), and ``merge_and_unload()`` gives the adapted model's logits exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
from peft import LoraConfig, PeftModel, get_peft_model

from clients.lora_targets import LoraTargetError, head_is_tied, plan_targets
from clients.trainer import LoraModel, LoraSettings
from fl_core.adapter_io import save_adapter

V, H = 96, 16
SMALL = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2)
KV = dict(intermediate_size=32, num_key_value_heads=2)
CONFIGS: dict[str, Callable[[], hf.PretrainedConfig]] = {
    "llama": lambda: hf.LlamaConfig(**SMALL, **KV),
    "qwen2": lambda: hf.Qwen2Config(**SMALL, **KV, tie_word_embeddings=True),
    "mistral": lambda: hf.MistralConfig(**SMALL, **KV),
    "gpt2": lambda: hf.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": lambda: hf.GPTNeoXConfig(**SMALL, intermediate_size=32),
    "opt": lambda: hf.OPTConfig(**SMALL, ffn_dim=32, word_embed_proj_dim=H),
}
#: Every attention and MLP projection of one block, by the architecture's own names.
PROJECTIONS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}
#: Projections per block (GPT-2 has a c_proj in attention and in the MLP).
PER_BLOCK = {arch: len(names) for arch, names in PROJECTIONS.items()} | {"gpt2": 4}
TIED = {"qwen2", "gpt2", "opt"}


def build(arch: str) -> hf.PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    return model.eval()


def randomise(lm: LoraModel, seed: int = 1) -> None:
    """B starts at zero (the adapter is a no-op); give every LoRA tensor a visible value."""
    rng = np.random.default_rng(seed)
    lm.set_tensors(
        {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in lm.tensors().items()}
    )


IDS = torch.tensor([[3, 17, 42, 5, 77, 9, 1, 60]])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_projection_is_adapted_and_merging_is_exact(arch: str) -> None:
    base = build(arch)
    assert head_is_tied(base) == (arch in TIED)
    lm = LoraModel(base, LoraSettings(rank=4))
    report = lm.describe()
    modules = report["modules"]
    assert isinstance(modules, dict)
    expected = set(PROJECTIONS[arch]) | ({"lm_head"} if arch not in TIED else set())
    assert set(modules) == expected
    body = {m for m in lm.plan.modules if m != lm.plan.head}
    assert len(body) == 2 * PER_BLOCK[arch]  # 2 blocks
    assert report["head"] == (None if arch in TIED else "lm_head")
    assert report["lora_parameters"] == lm.full_layout.size
    # The adapter config names only modules this model has.
    leaves = {name.rsplit(".", 1)[-1] for name, _ in build(arch).named_modules()}
    assert set(lm.adapter_config().target_modules) <= leaves
    # PEFT's own "all-linear" picks the same body modules.
    peft_model = get_peft_model(build(arch), LoraConfig(target_modules="all-linear"))
    assert body == set(peft_model.peft_config["default"].target_modules)

    randomise(lm)
    embeddings = lm.model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        adapted = lm.model(input_ids=IDS).logits
        merged_model = lm.model.merge_and_unload()
        merged = merged_model(input_ids=IDS).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged_model.get_input_embeddings().weight, embeddings)


@pytest.mark.parametrize("arch", sorted(TIED))
def test_a_tied_head_is_adapted_only_when_asked_and_then_untied(arch: str) -> None:
    lm = LoraModel(build(arch), LoraSettings(rank=4, head="yes"))
    assert lm.plan.untie_head and lm.describe()["head_untied"] is True
    assert not head_is_tied(lm.model.get_base_model())
    assert lm.model.get_base_model().config.tie_word_embeddings is False
    randomise(lm)
    embeddings = lm.model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        adapted = lm.model(input_ids=IDS).logits
        merged_model = lm.model.merge_and_unload()
        merged = merged_model(input_ids=IDS).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged_model.get_input_embeddings().weight, embeddings)


def test_plain_peft_on_a_tied_head_changes_the_input_embeddings_when_merged() -> None:
    # The failure the untying prevents: PEFT adapts the shared matrix, so after merging the
    # input lookup has moved too and the merged model no longer computes the adapted logits.
    model = build("gpt2")
    config = LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    embeddings = peft_model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad(), pytest.warns(UserWarning, match="tie_word_embeddings"):
        adapted = peft_model(input_ids=IDS).logits
        merged_model = peft_model.merge_and_unload()
    with torch.no_grad():
        merged = merged_model(input_ids=IDS).logits
    assert not torch.equal(merged_model.get_input_embeddings().weight, embeddings)
    assert (merged - adapted).abs().max() > 1e-3


def test_peft_default_and_named_targets() -> None:
    lm = LoraModel(build("gpt_neox"), LoraSettings(rank=2, targets=("peft-default",), head="no"))
    assert set(lm.describe()["modules"]) == {"query_key_value"}  # type: ignore[arg-type]
    lm = LoraModel(build("opt"), LoraSettings(rank=2, targets=("fc1", "out_proj")))
    assert set(lm.describe()["modules"]) == {"fc1", "out_proj"}  # type: ignore[arg-type]
    with pytest.raises(LoraTargetError, match=r"no linear module named 'q_proj'.*c_attn"):
        plan_targets(build("gpt2"), ("q_proj",))
    # Naming the head asks for it, as lora_head = yes does (and unties a tied one).
    assert plan_targets(build("gpt2"), ("c_attn", "lm_head")).untie_head
    with pytest.raises(LoraTargetError, match="names the output head 'lm_head' but lora_head"):
        plan_targets(build("llama"), ("lm_head",), head="no")
    model = build("llama")
    model.config.model_type = "no-such-architecture"
    with pytest.raises(LoraTargetError, match="PEFT has no default"):
        plan_targets(model, ("peft-default",))


def test_the_saved_adapter_loads_into_a_fresh_base_with_plain_peft(tmp_path: Path) -> None:
    lm = LoraModel(build("gpt2"), LoraSettings(rank=4))
    randomise(lm)
    save_adapter(tmp_path, lm.tensors(), lm.adapter_config())
    loaded = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, lm.model(input_ids=IDS).logits)


def test_describe_counts_only_lora_parameters_as_trainable() -> None:
    lm = LoraModel(copy.deepcopy(build("llama")), LoraSettings(rank=2, mode="ffa"))
    report = lm.describe()
    assert report["trainable_parameters"] == lm.layout.size
    assert report["lora_parameters"] == lm.full_layout.size > lm.layout.size

"""Local LoRA training: deterministic updates, FFA/plain modes, FedProx, SCAFFOLD, refusals,
and a global adapter that PEFT itself loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from clients.data import TokenizedDataset, alpaca_example, tokenize
from clients.devices import DeviceError, resolve_runtime
from clients.model_factory import TinyLlamaSpec, build_tiny_llama
from clients.synthetic import SyntheticFederation
from clients.trainer import (
    LoraModel,
    LoraSettings,
    ScaffoldControls,
    TrainingConfigError,
    TrainSettings,
    batch_indices,
    evaluate,
    train_local,
)
from fl_core.adapter_io import load_adapter, save_adapter
from fl_core.errors import NonFiniteUpdateError

FAST = TrainSettings(local_steps=4, batch_size=8, lr=1e-2, seed=5)


@pytest.fixture(scope="module")
def cardio(federation: SyntheticFederation, tokenizer: PreTrainedTokenizerFast) -> TokenizedDataset:
    records = federation.institutions[0].records
    return tokenize([alpaca_example(r) for r in records], tokenizer, 96, "cardiology-1")


def test_update_is_deterministic_and_matches_the_trained_weights(
    base: LlamaForCausalLM, cardio: TokenizedDataset, tokenizer: PreTrainedTokenizerFast
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    first = train_local(lm, g, cardio, FAST, tokenizer.pad_token_id)
    trained = lm.get_vector()
    second = train_local(lm, g, cardio, FAST, tokenizer.pad_token_id)
    assert first.delta.dtype == np.float32 and first.delta.shape == (lm.layout.size,)
    np.testing.assert_array_equal(first.delta, second.delta)
    np.testing.assert_allclose(trained, g + first.delta, rtol=0, atol=1e-7)
    assert first.num_samples == len(cardio) and first.steps == 4
    assert np.isfinite(first.mean_loss) and np.linalg.norm(first.delta) > 0
    other = train_local(lm, g, cardio, TrainSettings(**{**FAST.__dict__, "seed": 6}), 0)
    assert not np.array_equal(other.delta, first.delta)


def test_ffa_freezes_a_from_the_shared_seed_and_trains_only_b(
    tokenizer: PreTrainedTokenizerFast, small_spec: TinyLlamaSpec, cardio: TokenizedDataset
) -> None:
    settings = LoraSettings(rank=4, mode="ffa", init_seed=9)
    server = LoraModel(build_tiny_llama(len(tokenizer), small_spec), settings)
    client = LoraModel(build_tiny_llama(len(tokenizer), small_spec), settings)
    b_names = {n for n in client.full_layout.names if ".lora_B." in n}
    assert set(client.layout.names) == b_names and len(b_names) * 2 == len(client.full_layout.names)
    a_before = {k: v for k, v in client.tensors().items() if ".lora_A." in k}
    assert all(np.array_equal(v, server.tensors()[k]) for k, v in a_before.items())
    train_local(client, client.get_vector(), cardio, FAST, tokenizer.pad_token_id)
    a_after = {k: v for k, v in client.tensors().items() if ".lora_A." in k}
    assert all(np.array_equal(v, a_after[k]) for k, v in a_before.items())


def test_fedprox_pulls_the_update_towards_the_global_model(
    base: LlamaForCausalLM, cardio: TokenizedDataset
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    sgd = TrainSettings(local_steps=6, batch_size=8, lr=0.5, optimizer="sgd", max_grad_norm=1e9)
    free = train_local(lm, g, cardio, sgd, 0)
    prox = train_local(lm, g, cardio, TrainSettings(**{**sgd.__dict__, "prox_mu": 1.0}), 0)
    assert np.linalg.norm(prox.delta) < 0.9 * np.linalg.norm(free.delta)


def test_scaffold_option_two_control_update(
    base: LlamaForCausalLM, cardio: TokenizedDataset
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    rng = np.random.default_rng(0)
    c = (1e-3 * rng.normal(size=lm.layout.size)).astype(np.float32)
    ci = (1e-3 * rng.normal(size=lm.layout.size)).astype(np.float32)
    sgd = TrainSettings(local_steps=3, batch_size=8, lr=0.1, optimizer="sgd")
    res = train_local(lm, g, cardio, sgd, 0, ScaffoldControls(server=c, client=ci))
    assert res.new_client_control is not None and res.control_delta is not None
    expected = ci - c - res.delta / (3 * 0.1)
    np.testing.assert_allclose(res.new_client_control, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.control_delta, res.new_client_control - ci, atol=1e-7)
    with pytest.raises(TrainingConfigError, match="sgd"):
        train_local(lm, g, cardio, FAST, 0, ScaffoldControls(server=c, client=ci))


def test_nan_update_is_refused(base: LlamaForCausalLM, cardio: TokenizedDataset) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    with torch.no_grad():
        base.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(NonFiniteUpdateError):
        train_local(lm, g, cardio, FAST, 0)
    with pytest.raises(NonFiniteUpdateError, match="global model"):
        train_local(lm, np.full_like(g, np.inf), cardio, FAST, 0)


def test_settings_are_validated() -> None:
    with pytest.raises(TrainingConfigError, match="exactly one"):
        TrainSettings(local_steps=3, local_epochs=1)
    with pytest.raises(TrainingConfigError):
        TrainSettings(local_steps=0)
    assert TrainSettings(local_steps=None, local_epochs=2).local_epochs == 2


def test_training_on_a_domain_lowers_its_eval_loss_most(
    base: LlamaForCausalLM,
    federation: SyntheticFederation,
    tokenizer: PreTrainedTokenizerFast,
    cardio: TokenizedDataset,
) -> None:
    tests = {
        d: tokenize([alpaca_example(r) for r in recs], tokenizer, 96, d)
        for d, recs in federation.test_sets.items()
    }
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    before = evaluate(lm, g, tests, 0)
    res = train_local(lm, g, cardio, TrainSettings(local_steps=30, batch_size=8, lr=2e-2), 0)
    after = evaluate(lm, g + res.delta, tests, 0)
    gains = {d: before[d] - after[d] for d in tests}
    assert gains["cardiology"] > 0.3
    assert gains["cardiology"] > max(v for d, v in gains.items() if d != "cardiology")


def test_saved_global_adapter_loads_in_peft(
    tmp_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    small_spec: TinyLlamaSpec,
    cardio: TokenizedDataset,
) -> None:
    lm = LoraModel(build_tiny_llama(len(tokenizer), small_spec), LoraSettings(rank=4, mode="ffa"))
    res = train_local(lm, lm.get_vector(), cardio, FAST, 0)
    lm.set_vector(lm.get_vector())  # the trained weights are the "global" ones here
    save_adapter(tmp_path, lm.tensors(), lm.adapter_config())
    tensors, config = load_adapter(tmp_path)
    assert config == lm.adapter_config() and set(tensors) == set(lm.tensors())
    assert np.linalg.norm(res.delta) > 0
    peft_model = PeftModel.from_pretrained(build_tiny_llama(len(tokenizer), small_spec), tmp_path)
    ids = torch.tensor([cardio.input_ids[0].tolist()])
    with torch.no_grad():
        ours, theirs = lm.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours)
    plain = build_tiny_llama(len(tokenizer), small_spec)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, ours)


def test_data_order_visits_every_example_once_per_epoch_and_continues_across_calls() -> None:
    size, batch = 37, 8  # 5 batches per epoch, the last one short
    batches = batch_indices(size, batch, seed=3, first=0, count=10)
    for epoch in (batches[:5], batches[5:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(size))
    assert [len(b) for b in batches[:5]] == [8, 8, 8, 8, 5]
    assert not np.array_equal(np.concatenate(batches[:5]), np.concatenate(batches[5:]))
    # Rounds of 3 local steps, each starting where the previous one stopped, see exactly the
    # batches one long run would: no example is revisited before the epoch is through.
    rounds = [batch_indices(size, batch, 3, first, 3) for first in (0, 3, 6)]
    flat = [b for r in rounds for b in r]
    long_run = batch_indices(size, batch, 3, 0, 9)
    assert all(np.array_equal(a, b) for a, b in zip(flat, long_run, strict=True))
    assert batch_indices(size, batch, 4, 0, 5)[0].tolist() != batches[0].tolist()


def test_train_local_starts_at_its_data_offset(
    base: LlamaForCausalLM, cardio: TokenizedDataset
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    one_step = TrainSettings(local_steps=1, batch_size=8, lr=1e-2, seed=5, optimizer="sgd")
    at_two = train_local(lm, g, cardio, TrainSettings(**{**one_step.__dict__, "data_offset": 2}), 0)
    # The same single batch, handed over as a one-batch data set, gives the same update.
    index = batch_indices(len(cardio), 8, 5, 2, 1)[0]
    only = TokenizedDataset(
        tuple(cardio.input_ids[i] for i in index), tuple(cardio.labels[i] for i in index), 0
    )
    alone = train_local(lm, g, only, TrainSettings(**{**one_step.__dict__, "seed": 0}), 0)
    np.testing.assert_allclose(at_two.delta, alone.delta, rtol=1e-5, atol=1e-7)
    at_zero = train_local(lm, g, cardio, one_step, 0)
    assert not np.allclose(at_zero.delta, at_two.delta)
    with pytest.raises(TrainingConfigError, match="data_offset"):
        TrainSettings(data_offset=-1)


def test_lora_dropout_masks_change_with_the_data_offset(
    base: LlamaForCausalLM, cardio: TokenizedDataset
) -> None:
    # One example, so every step sees the same batch and only the dropout masks can differ.
    only = TokenizedDataset(cardio.input_ids[:1], cardio.labels[:1], 0)
    lm = LoraModel(base, LoraSettings(rank=4, dropout=0.5))
    g = lm.get_vector()
    settings = TrainSettings(local_steps=2, batch_size=1, lr=1e-2, seed=5)
    first = train_local(lm, g, only, settings, 0)
    again = train_local(lm, g, only, settings, 0)
    later = train_local(lm, g, only, TrainSettings(**{**settings.__dict__, "data_offset": 2}), 0)
    np.testing.assert_array_equal(first.delta, again.delta)
    assert not np.allclose(first.delta, later.delta)


def test_gradient_accumulation_gives_the_same_update(
    base: LlamaForCausalLM, cardio: TokenizedDataset
) -> None:
    lm = LoraModel(base, LoraSettings(rank=4))
    g = lm.get_vector()
    settings = TrainSettings(local_steps=3, batch_size=8, lr=1e-2, seed=5)
    whole = train_local(lm, g, cardio, settings, 0)
    split = train_local(lm, g, cardio, TrainSettings(**{**settings.__dict__, "grad_accum": 3}), 0)
    np.testing.assert_allclose(split.delta, whole.delta, rtol=1e-4, atol=1e-6)
    assert split.mean_loss == pytest.approx(whole.mean_loss, rel=1e-5)
    with pytest.raises(TrainingConfigError, match="grad_accum"):
        TrainSettings(batch_size=4, grad_accum=5)


def test_devices_this_machine_cannot_provide_are_refused() -> None:
    assert resolve_runtime("cpu", "auto").describe() == {
        "device": "cpu",
        "precision": "fp32",
        "quantization": "none",
    }
    assert resolve_runtime("cpu", "bf16").autocast is torch.bfloat16
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        resolve_runtime("cpu", "fp16")
    with pytest.raises(DeviceError, match=r"4bit .*needs a CUDA GPU; this run is on cpu"):
        resolve_runtime("cpu", "auto", "4bit")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device cuda: torch sees no CUDA device"):
            resolve_runtime("cuda")
        assert resolve_runtime("auto").device.type in ("cpu", "mps")


def test_bf16_autocast_trains_and_keeps_float32_updates(
    tokenizer: PreTrainedTokenizerFast, small_spec: TinyLlamaSpec, cardio: TokenizedDataset
) -> None:
    runtime = resolve_runtime("cpu", "bf16")
    lm = LoraModel(build_tiny_llama(len(tokenizer), small_spec), LoraSettings(rank=4), runtime)
    result = train_local(lm, lm.get_vector(), cardio, FAST, 0)
    assert result.delta.dtype == np.float32 and np.linalg.norm(result.delta) > 0
    losses = evaluate(lm, lm.get_vector(), {"cardio": cardio}, 0)
    assert np.isfinite(losses["cardio"])

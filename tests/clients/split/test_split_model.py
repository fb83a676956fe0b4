"""The model cut is exact: a split step computes what the whole model computes."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers as hf

from clients.data import alpaca_example, tokenize
from clients.model_factory import TinyLlamaSpec, build_tiny_llama
from clients.split.middle import MiddleServer, MiddleSettings
from clients.split.model import SplitModel, activation_noise, decoder_blocks
from clients.split.trainer import (
    InProcessLink,
    padded_batch,
    response_loss,
    split_train_local,
)
from clients.synthetic import SyntheticFederation
from clients.trainer import LoraModel, LoraSettings, TrainSettings
from fl_core.split import (
    ClientDropped,
    NotYourTurn,
    SplitConfigError,
    SplitSpec,
    SplitTensorError,
)

DEEP = TinyLlamaSpec(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64)
LORA = LoraSettings(rank=4, alpha=8, init_seed=3)


def _pair(vocab: int, spec: SplitSpec) -> tuple[SplitModel, SplitModel]:
    """The institution's and the server's model: two copies of one base and adapter."""
    base = build_tiny_llama(vocab, DEEP)
    client = SplitModel(LoraModel(copy.deepcopy(base), LORA), spec)
    server = SplitModel(LoraModel(base, LORA), spec)
    # A non-zero B everywhere, so every LoRA tensor gets a gradient.
    vector = client.full_vector()
    vector += np.random.default_rng(0).normal(0, 0.05, vector.size).astype(np.float32)
    client.lm.set_vector(vector)
    server.lm.set_vector(vector)
    return client, server


def _batch(federation: SyntheticFederation, tokenizer, rows: int = 3):  # type: ignore[no-untyped-def]
    records = federation.institutions[0].records[:rows]
    data = tokenize([alpaca_example(r) for r in records], tokenizer, 128, "t")
    assert len(data) == rows
    return data, padded_batch(data, np.arange(rows), int(tokenizer.pad_token_id))


@pytest.mark.parametrize(("bottom", "top"), [(0, 0), (1, 0), (1, 1), (0, 2), (2, 1)])
def test_split_step_equals_the_whole_model(
    federation: SyntheticFederation, tokenizer, bottom: int, top: int
) -> None:  # type: ignore[no-untyped-def]
    spec = SplitSpec(bottom, top)
    client, server = _pair(len(tokenizer), spec)
    reference = copy.deepcopy(client.lm)
    _, (ids, labels, mask) = _batch(federation, tokenizer)
    middle = MiddleServer(server, MiddleSettings(lr=0.1, max_grad_norm=1e9, optimizer="sgd"))
    middle.begin_round([7], 1, client.limits(8, 128))

    # The whole model's loss and LoRA gradients.
    reference.model.train()
    want_loss = response_loss(reference.model(input_ids=ids, attention_mask=mask).logits, labels)
    want_loss.backward()
    want = {
        n: p.grad.detach().numpy().copy()
        for n, p in zip(reference.layout.names, reference.trainable_parameters(), strict=True)
    }

    client.lm.model.train()
    logits, _ = client.client_logits(ids, mask, InProcessLink(middle, 7), 0)
    loss = response_loss(logits, labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    before = server.server_vector()
    loss.backward()
    got = {
        n: p.grad.detach().numpy()
        for n, p in zip(client.layout.client.names, client.client_parameters(), strict=True)
    }
    for name in client.layout.client.names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # The server took one SGD step (lr 0.1, no clipping) with exactly the whole model's gradient.
    step = (before - server.server_vector()) / 0.1
    expected = server.layout.server.flatten({n: want[n] for n in server.layout.server.names})
    np.testing.assert_allclose(step, expected, rtol=1e-3, atol=1e-5)
    assert set(client.layout.client.names) | set(client.layout.server.names) == set(
        client.lm.layout.names
    )


def test_the_cut_assigns_blocks_head_to_the_client(tokenizer) -> None:  # type: ignore[no-untyped-def]
    client, _ = _pair(len(tokenizer), SplitSpec(1, 1))
    assert all(
        ".layers.0." in n or ".layers.3." in n or "lm_head" in n for n in client.layout.client.names
    )
    assert all(".layers.1." in n or ".layers.2." in n for n in client.layout.server.names)
    assert any("lm_head" in n for n in client.layout.client.names)
    prefix, blocks = decoder_blocks(client.lm.model)
    assert prefix.endswith("layers") and len(blocks) == 4


def test_a_cut_without_server_blocks_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    base = build_tiny_llama(len(tokenizer), DEEP)
    with pytest.raises(SplitConfigError, match="leaves the server none"):
        SplitModel(LoraModel(base, LORA), SplitSpec(2, 2))


def test_steps_out_of_turn_and_bad_tensors_are_refused(
    federation: SyntheticFederation, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    client, server = _pair(len(tokenizer), SplitSpec(1, 0))
    middle = MiddleServer(server, MiddleSettings(lr=0.01))
    middle.begin_round([1, 2], 2, client.limits(4, 64))
    hidden = np.zeros((2, 5, 32), dtype=np.float32)
    lengths = np.array([5, 3])
    with pytest.raises(NotYourTurn):
        middle.activation(2, 0, hidden, lengths)
    bad = hidden.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(SplitTensorError, match="NaN"):
        middle.activation(1, 0, bad, lengths)
    # Client 1 was dropped for it: its turn passed to client 2.
    with pytest.raises(ClientDropped):
        middle.activation(1, 0, hidden, lengths)
    with pytest.raises(SplitTensorError, match="hidden width"):
        middle.activation(2, 0, np.zeros((2, 5, 16), dtype=np.float32), lengths)


def test_local_round_trains_both_parts_and_returns_the_client_delta(
    federation: SyntheticFederation, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    client, server = _pair(len(tokenizer), SplitSpec(1, 0))
    data, _ = _batch(federation, tokenizer, rows=8)
    middle = MiddleServer(server, MiddleSettings(lr=0.01))
    middle.begin_round([1], 3, client.limits(4, 128))
    start_server = server.server_vector()
    start = client.client_vector()
    settings = TrainSettings(local_steps=3, batch_size=4, lr=0.01, num_threads=None)
    result = split_train_local(
        client, start, data, settings, int(tokenizer.pad_token_id), InProcessLink(middle, 1)
    )
    assert result.delta.shape == start.shape and np.abs(result.delta).max() > 0
    assert np.abs(server.server_vector() - start_server).max() > 0
    assert middle.traffic.steps == {1: 3}
    assert middle.round is not None and middle.round.finished == (1,)


def test_activation_noise_has_the_stated_ratio() -> None:
    activation = np.random.default_rng(1).normal(0, 3.0, (4, 50, 64)).astype(np.float32)
    noise = activation_noise(activation, 0.5)
    rms = np.sqrt(np.mean(activation**2, axis=-1))
    ratio = np.sqrt(np.mean(noise**2, axis=-1)) / rms
    assert abs(float(ratio.mean()) - 0.5) < 0.02
    assert not np.allclose(noise, activation_noise(activation, 0.5))  # fresh every call


V, H = 96, 16
_SMALL = dict(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=2)
_KV = dict(intermediate_size=32, num_key_value_heads=2)
#: Tiny random configs of every architecture the trainer supports (no dropout: the comparison is
#: exact only without it).
ARCHITECTURES: dict[str, Callable[[], hf.PretrainedConfig]] = {
    "qwen2": lambda: hf.Qwen2Config(**_SMALL, **_KV, tie_word_embeddings=True),
    "mistral": lambda: hf.MistralConfig(**_SMALL, **_KV),
    "gpt2": lambda: hf.GPT2Config(
        vocab_size=V,
        n_embd=H,
        n_layer=3,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "gpt_neox": lambda: hf.GPTNeoXConfig(**_SMALL, intermediate_size=32),
    "opt": lambda: hf.OPTConfig(
        **_SMALL, ffn_dim=32, word_embed_proj_dim=H, dropout=0.0, attention_dropout=0.0
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_other_architectures_split_exactly(arch: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = hf.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).eval()
    settings = LoraSettings(rank=2, alpha=4, init_seed=1)
    client = SplitModel(LoraModel(copy.deepcopy(base), settings), SplitSpec(1, 1))
    server = SplitModel(LoraModel(base, settings), SplitSpec(1, 1))
    vector = client.full_vector()
    vector += np.random.default_rng(0).normal(0, 0.05, vector.size).astype(np.float32)
    client.lm.set_vector(vector)
    server.lm.set_vector(vector)
    reference = copy.deepcopy(client.lm)
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    want_loss = response_loss(reference.model(input_ids=ids, attention_mask=mask).logits, labels)
    want_loss.backward()
    want = dict(zip(reference.layout.names, reference.trainable_parameters(), strict=True))
    middle = MiddleServer(server, MiddleSettings(lr=0.01))
    middle.begin_round([1], 1, client.limits(2, 16))
    logits, _ = client.client_logits(ids, mask, InProcessLink(middle, 1), 0)
    loss = response_loss(logits, labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, param in zip(client.layout.client.names, client.client_parameters(), strict=True):
        grad = want[name].grad
        assert grad is not None and param.grad is not None
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6, msg=name)

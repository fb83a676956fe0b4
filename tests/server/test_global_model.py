"""The server's global LoRA model: round fields, applying a released sum, checkpoint/restore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fl_core.adapter_io import AdapterConfig, load_adapter, save_adapter
from fl_core.cli import main as fedsec
from secagg.encoding import QuantizationParams, encode
from secagg.params import SessionShape
from secagg.protocol import AggregateResult
from server.config import load_server_config
from server.global_model import GlobalModel

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    assert (
        fedsec(["keygen", "--out", str(tmp_path / "d"), "--clients", "3", "--task", "random"]) == 0
    )
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    tensors = {
        A: rng.standard_normal((2, 8)).astype(np.float32),
        B: np.zeros((8, 2), np.float32),
    }
    save_adapter(root / "initial", tensors, AdapterConfig(2, 4, ("q_proj",)))
    text = (root / "server.toml").read_text()
    (root / "server.toml").write_text(
        text[: text.index("[task]")]
        + '[task]\nkind = "train"\ninitial_adapter = "initial"\nlora_mode = "ffa"\n'
        'strategy = "fedavgm"\nmax_weight = 50\n\n[task.strategy_params]\nbeta1 = 0.5\n'
    )
    return root / "server.toml"


def test_released_sum_updates_the_adapter_and_survives_a_restart(config_path: Path) -> None:
    config = load_server_config(config_path)
    model = GlobalModel(config)
    assert model.vector.size == 16  # FFA: only B is trained and sent
    shape = SessionShape(2, None, 2)
    round_config, payload = model.round_config(0, bytes(32), (1, 2, 3), shape)
    codec = round_config.masking.codec
    assert len(payload) == 4 * 16 and codec.encoded_dim == 17 and codec.weighted
    assert codec.quant is not None
    quant = QuantizationParams(
        32, codec.quant.clip, codec.quant.scale, 3, max_weight=50, weighted=True
    )
    deltas = {1: np.full(16, 0.01, np.float32), 2: np.full(16, -0.02, np.float32)}
    weights = {1: 30, 2: 10}
    total = sum(encode(deltas[c], quant, weights[c]).vector.astype(np.uint64) for c in deltas)
    ring_sum = (np.asarray(total) % (1 << 32)).astype(np.uint32)
    model.apply_sum(model.decode(round_config, AggregateResult(ring_sum, (1, 2))))
    mean = (30 * 0.01 + 10 * -0.02) / 40  # weighted FedAvg mean; FedAvgM's first step equals it
    np.testing.assert_allclose(model.vector, mean, atol=1e-6)

    directory = config_path.parent / "state" / "checkpoints"
    path, adapter = model.save(directory, 0)
    assert adapter == directory / "adapter-000000"
    tensors, _ = load_adapter(adapter)
    np.testing.assert_array_equal(tensors[B].reshape(-1), model.vector)
    assert A in tensors  # the frozen A goes into the PEFT adapter unchanged

    restarted = GlobalModel(config)
    restarted.restore(path)
    np.testing.assert_array_equal(restarted.vector, model.vector)
    np.testing.assert_array_equal(
        restarted.strategy.state_dict()["m"], model.strategy.state_dict()["m"]
    )

"""Federated LoRA training through the real deployment equals the same rounds run in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Deployment

from clients.client_config import load_client_config
from clients.synthetic import make_federation
from clients.train_task import LocalTrainer
from fl_core.adapter_io import load_adapter
from fl_core.strategies import AggregateInput, FedAvg
from fl_core.wire import fedsec_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

CLIENTS = 5
RECORDS = 12
TRAIN = f"""
[train]
institutions = {CLIENTS}
records = {RECORDS}
lora_rank = 2
lora_alpha = 4
lora_mode = "ffa"
max_length = 64
threads = 1
"""


def _server_task(adapter: Path) -> str:
    return f"""[task]
kind = "train"
initial_adapter = "{adapter}"
lora_mode = "ffa"
strategy = "fedavg"
local_steps = 2
lr = 0.01
batch_size = 4
max_weight = 64
"""


def test_two_training_rounds_equal_the_in_process_run(deploy: Callable[..., Deployment]) -> None:
    # Nobody dies here, so a deadline only ever ends a stage when a slow (loaded) machine makes a
    # live client late, which would change the sum: deadlines far above any honest delay.
    d = deploy(CLIENTS, count=2, stage_timeout_s=300.0, join_timeout_s=600.0)
    names = [i.name for i in make_federation(CLIENTS, RECORDS).institutions]
    extras = {c: f'{TRAIN}\n[data]\nsynthetic = "{names[c - 1]}"\n' for c in range(1, CLIENTS + 1)}
    # The coordinator's starting adapter, written with an institution's model settings.
    configs = {c: d.client_config(c, extras[c]) for c in extras}
    trainers = {c: LocalTrainer(load_client_config(configs[c])) for c in configs}
    adapter = d.root / "initial-adapter"
    trainers[1].write_initial_adapter(adapter)
    server_toml = d.root / "server.toml"
    text = server_toml.read_text()
    server_toml.write_text(text[: text.index("[task]")] + _server_task(adapter))

    server = d.start_server()
    clients = [d.start_client(c, extras[c]) for c in extras]
    assert server.wait_exit(900) == 0, server.text()[-3000:]
    for proc in clients:
        assert proc.wait_exit(30) == 0

    # Each round again in this process, from the global the deployment started it with: same
    # base, data and seeds, FedAvg on exact floats. (Round by round, because Adam can turn the
    # encoding's 2^-21-sized differences in a near-zero gradient into a full step later on.)
    initial = trainers[1].lm.get_vector()
    start = initial
    for number in range(2):
        config = pb.RoundConfig(round_number=number, cohort=list(range(1, CLIENTS + 1)))
        config.train.seed = 7
        config.train.local_steps = 2
        config.train.learning_rate = 0.01
        config.train.batch_size = 4
        config.train.layout_fingerprint = trainers[1].lm.layout.fingerprint()
        results = [trainers[c].train(config, start) for c in sorted(trainers)]
        total = sum(r.num_samples * r.delta.astype(np.float64) for r in results)
        weight = float(sum(r.num_samples for r in results))
        released = AggregateInput(np.asarray(total), weight, len(results))
        expected = FedAvg(start.size).aggregate(start, released).astype(np.float32)
        deployed = d.checkpoint(number)
        assert np.abs(expected - start).max() > 1e-3  # training moved the adapter
        # The secure sum differs from exact floats only by the fixed-point encoding.
        np.testing.assert_allclose(deployed, expected, rtol=0, atol=1e-6)
        start = deployed

    tensors, _ = load_adapter(d.root / "state" / "checkpoints" / "adapter-000001")
    lm = trainers[1].lm
    b_names = lm.layout.names
    assert all(".lora_B." in n for n in b_names)
    np.testing.assert_array_equal(
        lm.layout.flatten({n: tensors[n] for n in b_names}), d.checkpoint(1)
    )
    assert set(tensors) == set(lm.full_layout.names)  # frozen A tensors are kept too

"""Federated LoRA training through the real deployment equals the same rounds run in-process:
FedAvg on exact floats, and SCAFFOLD (client options and control variates on the wire) through
the round core's client step and codec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Deployment

from fl_core.adapter_io import load_adapter
from fl_core.round import client_contribution
from fl_core.round_config import TrainTask
from fl_core.strategies import AggregateInput, FedAvg, Scaffold
from secagg.ring import Ring
from server.config import load_server_config
from server.global_model import GlobalModel

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


def _server_task(adapter: Path, strategy: str = "fedavg") -> str:
    return f"""[task]
kind = "train"
initial_adapter = "{adapter}"
lora_mode = "ffa"
strategy = "{strategy}"
local_steps = 2
lr = 0.01
batch_size = 4
max_weight = 64
"""


def test_two_training_rounds_equal_the_in_process_run(deploy: Callable[..., Deployment]) -> None:
    # Nobody dies here, so a deadline only ever ends a stage when a slow (loaded) machine makes a
    # live client late, which would change the sum: deadlines far above any honest delay.
    d = deploy(CLIENTS, count=2, stage_timeout_s=300.0, join_timeout_s=600.0)
    training = d.set_up_training(TRAIN, RECORDS, _server_task)
    extras, trainers = training.extras, training.trainers

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
        task = TrainTask(
            seed=7,
            local_steps=2,
            learning_rate=0.01,
            batch_size=4,
            layout_fingerprint=trainers[1].lm.layout.fingerprint(),
        )
        results = [trainers[c].train(task, start) for c in sorted(trainers)]
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


def test_scaffold_rounds_over_grpc_follow_the_round_core(
    deploy: Callable[..., Deployment],
) -> None:
    clients = 4
    d = deploy(clients, count=2, stage_timeout_s=300.0, join_timeout_s=600.0)
    train = TRAIN.replace(f"institutions = {CLIENTS}", f"institutions = {clients}")
    training = d.set_up_training(train, RECORDS, lambda a: _server_task(a, "scaffold"))
    extras, trainers = training.extras, training.trainers
    server_toml = d.root / "server.toml"
    # The codec the server sends each round, as the in-process run would build it.
    # (Kept: start_server rewrites server.toml with the port it got.)
    server_config = load_server_config(server_toml)
    codec = GlobalModel(server_config).encoding.codec(clients)

    server = d.start_server()
    procs = [d.start_client(c, extras[c]) for c in extras]
    assert server.wait_exit(900) == 0, server.text()[-3000:]
    for proc in procs:
        assert proc.wait_exit(30) == 0

    # In process: each client's own control variate kept between rounds (in its trainer), the
    # server's c carried by the strategy, every contribution through the same codec.
    start = trainers[1].lm.get_vector()
    strategy = Scaffold(start.size, num_clients=clients)
    for number in range(2):
        task = TrainTask(
            seed=7,
            local_steps=2,
            learning_rate=0.01,
            optimizer="sgd",  # what the server's SCAFFOLD recipe sends
            batch_size=4,
            layout_fingerprint=trainers[1].lm.layout.fingerprint(),
        )
        control = strategy.client_options().server_control
        ring = Ring(codec.ring_bits)
        ring_sum = ring.zeros(codec.encoded_dim)
        for c in sorted(trainers):
            result = trainers[c].train(task, start, control)
            assert result.control_delta is not None
            unit, weight = client_contribution(
                strategy, result.delta, result.num_samples, result.control_delta, dp=False
            )
            # The secure sum without its masks: addition in the ring.
            ring_sum = ring.reduce(ring_sum + codec.encode(unit, weight).vector)
        expected = strategy.aggregate(start, codec.decode(ring_sum, clients))
        deployed = d.checkpoint(number)
        assert np.abs(expected - start).max() > 1e-4  # training moved the adapter
        np.testing.assert_allclose(deployed, expected, rtol=0, atol=1e-6)
        start = deployed
    # The server's control variate, checkpointed with the strategy state, is the one computed
    # here: the clients' control deltas crossed the wire intact.
    restarted = GlobalModel(server_config)
    restarted.restore(d.root / "state" / "checkpoints" / "round-000001.safetensors")
    np.testing.assert_allclose(restarted.strategy.state_dict()["c"], strategy.c, atol=1e-6)

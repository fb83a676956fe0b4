"""SFT then DPO through the real deployment equals the same rounds run in-process: the DPO
updates take the same encoding and secure sum as SFT's, against the stage's reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import Deployment

from fl_core.round_config import TrainTask
from fl_core.strategies import AggregateInput, FedAvg
from server.global_model import vector_digest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

CLIENTS = 5
RECORDS = 12
TRAIN = f"""
[train]
institutions = {CLIENTS}
records = {RECORDS}
lora_rank = 2
lora_alpha = 4
max_length = 64
threads = 1
"""


def _server_task(adapter: Path) -> str:
    return f"""[task]
kind = "train"
initial_adapter = "{adapter}"
strategy = "fedavg"
local_steps = 2
lr = 0.01
batch_size = 4
max_weight = 64
stage = "sft+dpo"
dpo_rounds = 2
dpo_lr = 0.002
dpo_beta = 0.5
dpo_reference = "sft"
"""


def test_sft_then_dpo_rounds_equal_the_in_process_run(
    deploy: Callable[..., Deployment],
) -> None:
    d = deploy(CLIENTS, count=3, stage_timeout_s=300.0, join_timeout_s=600.0)
    training = d.set_up_training(TRAIN, RECORDS, _server_task)
    extras, trainers = training.extras, training.trainers

    server = d.start_server()
    clients = [d.start_client(c, extras[c]) for c in extras]
    assert server.wait_exit(900) == 0, server.text()[-3000:]
    for proc in clients:
        assert proc.wait_exit(30) == 0

    start = trainers[1].lm.get_vector()
    reference = b""
    for number, (objective, lr) in enumerate((("sft", 0.01), ("dpo", 0.002), ("dpo", 0.002))):
        task = TrainTask(
            seed=7,
            local_steps=2,
            batch_size=4,
            learning_rate=lr,
            layout_fingerprint=trainers[1].lm.layout.fingerprint(),
            objective=objective,
        )
        if objective == "dpo":
            reference = reference or vector_digest(start)  # the stage's first round's vector
            task = replace(task, dpo_beta=0.5, dpo_loss="sigmoid", dpo_reference=reference)
        results = [trainers[c].train(task, start) for c in sorted(trainers)]
        if objective == "dpo":
            pairs = [trainers[c].pairs for c in sorted(trainers)]
            assert [r.num_samples for r in results] == [len(p or ()) for p in pairs]
        total = sum(r.num_samples * r.delta.astype(np.float64) for r in results)
        weight = float(sum(r.num_samples for r in results))
        released = AggregateInput(np.asarray(total), weight, len(results))
        expected = FedAvg(start.size).aggregate(start, released).astype(np.float32)
        deployed = d.checkpoint(number)
        assert np.abs(expected - start).max() > 1e-4  # training moved the adapter
        np.testing.assert_allclose(deployed, expected, rtol=0, atol=1e-6)
        start = deployed
    state = d.root / "state" / "checkpoints" / "dpo-reference.sha256"
    assert bytes.fromhex(state.read_text().strip()) == reference

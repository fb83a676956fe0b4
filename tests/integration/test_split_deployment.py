"""Split training through the real deployment (server and institutions as processes, TLS, the
same admission) equals the same rounds run in one process (FedProx's term applied through the
stream); with distributed DP the client parts go through the round core's DP codec; the run
directory passes the audit; a client lost mid-step is dropped."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Deployment

from clients.client_config import load_client_config
from clients.split.train_task import split_update
from clients.split.trainer import InProcessLink
from clients.synthetic import make_federation
from clients.train_task import LocalTrainer
from fl_core.adapter_io import load_adapter
from fl_core.cli import main as fedsec
from fl_core.round_config import TrainTask
from fl_core.strategies import AggregateInput, FedProx
from server.checkpoints import load_checkpoint
from server.config import load_server_config
from server.split_service import build_split_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

CLIENTS = 3
#: A split server builds its model (torch, the base, its tokenizer) before it listens: on a
#: loaded 2-core machine that took more than the harness's default 30 s.
SERVER_START_S = 300.0
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


MU = 0.5  # FedProx's proximal coefficient: the institutions train with it through the stream


def _server_task(adapter: Path, step_timeout_s: float) -> str:
    return f"""[task]
kind = "split"
initial_adapter = "{adapter}"
strategy = "fedprox"
local_steps = 2
lr = 0.01
batch_size = 4
max_weight = 64

[task.strategy_params]
mu = {MU}

[split]
client_bottom = 1
institutions = {CLIENTS}
records = {RECORDS}
max_length = 64
step_timeout_s = {step_timeout_s}
threads = 1
"""


def _deployment(
    deploy: Callable[..., Deployment],
    rounds: int,
    step_timeout_s: float,
    stalled: int | None,
    server_extra: str = "",
) -> tuple[Deployment, dict[int, str], dict[int, LocalTrainer]]:
    d = deploy(
        CLIENTS,
        count=rounds,
        min_clients=CLIENTS,
        threshold=2,
        stage_timeout_s=300.0,
        join_timeout_s=600.0,
    )
    names = [i.name for i in make_federation(CLIENTS, RECORDS).institutions]
    extras = {c: f'{TRAIN}\n[data]\nsynthetic = "{names[c - 1]}"\n' for c in range(1, CLIENTS + 1)}
    if stalled is not None:
        extras[stalled] += '\n[testing]\nstall_before = "split_gradient"\n'
    configs = {c: d.client_config(c, extras[c]) for c in extras}
    trainers = {c: LocalTrainer(load_client_config(configs[c])) for c in configs}
    adapter = d.root / "initial-adapter"
    trainers[1].write_initial_adapter(adapter)
    server_toml = d.root / "server.toml"
    text = server_toml.read_text()
    split_toml = text[: text.index("[task]")] + _server_task(adapter, step_timeout_s) + server_extra
    server_toml.write_text(split_toml)
    # The harness rewrites server.toml after start (its port); keep the split one for later.
    (d.root / "split-server.toml").write_text(split_toml)
    return d, extras, trainers


def test_split_rounds_over_grpc_equal_the_in_process_run(
    deploy: Callable[..., Deployment],
) -> None:
    d, extras, trainers = _deployment(deploy, 2, 120.0, None)
    server = d.start_server(SERVER_START_S)
    clients = [d.start_client(c, extras[c]) for c in extras]
    assert server.wait_exit(900) == 0, server.text()[-3000:]
    for proc in clients:
        assert proc.wait_exit(30) == 0
    assert "stage split_steps complete (3 clients)" in server.text()

    # The same rounds in this process: the server's model built from the same server.toml, the
    # institutions' trainers from the same client.toml files, the same turn order; each round
    # from the checkpoint the deployment started it with (both parts).
    torch.set_num_threads(1)
    service = build_split_service(load_server_config(d.root / "split-server.toml"))
    middle = service._middle
    client_part = middle.split.layout.client
    start = middle.split.client_vector()
    for number in range(2):
        train = TrainTask(
            seed=7,
            local_steps=2,
            learning_rate=0.01,
            batch_size=4,
            max_weight=64,
            strategy="fedprox",
            prox_mu=MU,
            layout_fingerprint=client_part.fingerprint(),
        )
        task = service.task(train, 64)
        middle.begin_round(list(range(1, CLIENTS + 1)), 2, task.limits)
        model = start.astype("<f4").tobytes()
        results = [
            split_update(trainers[c], task, model, InProcessLink(middle, c)) for c in (1, 2, 3)
        ]
        total = sum(r.num_samples * r.delta.astype(np.float64) for r in results)
        weight = float(sum(r.num_samples for r in results))
        released = AggregateInput(np.asarray(total), weight, len(results))
        expected = FedProx(start.size, mu=MU).aggregate(start, released).astype(np.float32)
        deployed = load_checkpoint(
            d.root / "state" / "checkpoints" / f"round-{number:06d}.safetensors"
        )
        assert np.abs(expected - start).max() > 1e-3  # training moved the client part
        # The secure sum differs from exact floats only by the fixed-point encoding.
        np.testing.assert_allclose(deployed.global_vector, expected, rtol=0, atol=1e-6)
        assert deployed.server_part is not None
        np.testing.assert_allclose(deployed.server_part, middle.vector(), rtol=0, atol=1e-6)
        start = deployed.global_vector
        middle.set_vector(deployed.server_part)

    # The round's PEFT adapter holds both parts.
    tensors, _ = load_adapter(d.root / "state" / "checkpoints" / "adapter-000001")
    final = load_checkpoint(d.root / "state" / "checkpoints" / "round-000001.safetensors")
    assert final.server_part is not None
    full = middle.split.layout.join(final.global_vector, final.server_part)
    np.testing.assert_array_equal(middle.split.layout.full.flatten(
        {n: tensors[n] for n in middle.split.layout.full.names}), full)  # fmt: skip

    # STATE_DIR/run is a run directory the audit reads; it says what the server saw.
    run = d.root / "state" / "run"
    described = json.loads((run / "run.json").read_text())
    assert described["mode"] == "split" and described["strategy"] == "fedprox"
    assert described["split"]["client_part"] == client_part.size
    assert described["split"]["server_blocks"] == [1, middle.split.num_layers - 1]
    assert fedsec(["audit", str(run)]) == 0
    report = json.loads((run / "privacy.json").read_text())
    assert report["passed"] is True
    assert "which the server is not told" in report["split_statement"]


def test_split_rounds_with_distributed_dp_are_noised_ledgered_and_audited(
    deploy: Callable[..., Deployment],
) -> None:
    """The client parts go through the round core's DP codec (clip, rotate, noise at weight 1):
    every institution charges its ledger, the audit composes the releases."""
    d, extras, _ = _deployment(
        deploy, 1, 120.0, None, server_extra="\n[dp]\nepsilon = 8.0\ndelta = 1e-5\nclip = 1.0\n"
    )
    server = d.start_server(SERVER_START_S)
    clients = [d.start_client(c, extras[c]) for c in extras]
    assert server.wait_exit(900) == 0, server.text()[-3000:]
    for proc in clients:
        assert proc.wait_exit(30) == 0
    assert "round 0 completed" in server.text()
    for c in extras:
        ledger = json.loads((d.root / f"client-{c}" / "privacy-ledger.json").read_text())
        assert len(ledger["releases"]) == 1
    run = d.root / "state" / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["mechanism"] for m in metrics] == ["skellam"]
    assert fedsec(["audit", str(run)]) == 0
    report = json.loads((run / "privacy.json").read_text())
    assert report["passed"] is True and report["differential_privacy"]["epsilon_total"] > 0
    assert report["split_statement"]


@pytest.mark.parametrize(
    ("fault", "step_timeout_s", "reason"),
    [
        # It hangs: the step's deadline drops it.
        ("hangs", 5.0, r"lost mid-step 0: no gradient within 5 s"),
        # Its process is killed: the stream ends, and it is dropped at once (the deadline is
        # far off).
        ("killed", 300.0, r"(closed its stream|connection lost) mid-step 0"),
    ],
)
def test_a_client_lost_mid_step_is_dropped_and_the_round_completes(
    deploy: Callable[..., Deployment], fault: str, step_timeout_s: float, reason: str
) -> None:
    d, extras, _ = _deployment(deploy, 1, step_timeout_s, stalled=2)
    server = d.start_server(SERVER_START_S)
    clients = {c: d.start_client(c, extras[c]) for c in extras}
    clients[2].wait_for("fault injection: stalling before the gradient of step 0", 300)
    if fault == "killed":
        clients[2].kill()
    found = server.wait_for(r"client 2 dropped from split training: (.*)", 300)
    assert re.search(reason, found.group(1)), found.group(1)
    done = server.wait_for(r"round 0 completed .*: 2 contributors \[1, 3\], (.*), checkpoint", 600)
    assert done.group(1) == "dropped [2]"
    assert server.wait_exit(120) == 0, server.text()[-3000:]
    for c in (1, 3):
        assert clients[c].wait_exit(60) == 0

"""The README's deployment, as a hospital's IT would run it: `fedsec keygen` makes a federation
that fine-tunes the embedded model; a real server and three clients train it over TLS; the global
adapter the server checkpoints loads in plain PEFT from the deployment directory alone, and the
deployment's run record passes `fedsec audit`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Proc
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fl_core.adapter_io import load_adapter
from fl_core.cli import main as fedsec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_keygen_deployment_trains_and_its_adapter_loads_in_peft(tmp_path: Path) -> None:
    root = tmp_path / "dep"
    assert fedsec(["keygen", "--out", str(root), "--clients", "3", "--port", "1"]) == 0
    server_toml = root / "server.toml"
    text = re.sub(r'listen = ".*"', 'listen = "127.0.0.1:0"', server_toml.read_text())
    # Fewer, smaller local steps than the recipe's default: the same path, a faster test.
    server_toml.write_text(
        text.replace('strategy = "fedavg"', 'strategy = "fedavg"\nlocal_steps = 2\nbatch_size = 4')
    )
    server = Proc(["server", "--config", "server.toml"], root / "server.log", root)
    port = server.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 30).group(1)
    clients = []
    for c in (1, 2, 3):
        config = root / f"client-{c}" / "client.toml"
        config.write_text(config.read_text().replace("localhost:1", f"localhost:{port}"))
        clients.append(
            Proc(["client", "--config", "client.toml"], root / f"c{c}.log", config.parent)
        )
    try:
        assert server.wait_exit(480) == 0, server.text()[-3000:]
        for proc in clients:
            assert proc.wait_exit(60) == 0, proc.text()[-2000:]
    finally:
        for proc in (server, *clients):
            proc.kill()

    last = root / "state" / "checkpoints" / "adapter-000002"
    start, _ = load_adapter(root / "initial-adapter")
    trained, _ = load_adapter(last)
    moved = max(float(np.abs(trained[n] - start[n]).max()) for n in start)
    assert moved > 1e-4, "three rounds of training left the adapter where it started"

    # What the README shows: the base and the adapter from the deployment directory alone.
    base = AutoModelForCausalLM.from_pretrained(root / "base-model")
    tokenizer = AutoTokenizer.from_pretrained(root / "base-model")
    ids = tokenizer("Patient reports chest pain.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(last))
        after = model(ids).logits
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after), "the global adapter changed nothing"

    assert fedsec(["audit", str(root / "state" / "run")]) == 0

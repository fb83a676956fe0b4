"""Split mode in the deployment's files: server.toml ``kind = "split"`` with its ``[split]`` table
and client.toml ``[split]``, each key parsed or refused with a line naming what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.client_config import load_client_config
from fl_core.adapter_io import AdapterConfig, save_adapter
from fl_core.cli import main as fedsec
from fl_core.toml_config import ConfigError
from server.config import SplitServerConfig, load_server_config

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
TASK = '[task]\nkind = "split"\ninitial_adapter = "embedded"\nlocal_steps = 2\n'


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "d"
    assert fedsec(["keygen", "--out", str(out), "--clients", "3"]) == 0
    tensors = {A: np.ones((2, 8), np.float32), B: np.zeros((8, 2), np.float32)}
    save_adapter(out / "embedded", tensors, AdapterConfig(2, 4, ("q_proj",)))
    save_adapter(out / "pretrained", tensors, AdapterConfig(2, 4, ("q_proj",), 0.0, "/models/x"))
    return out


def server_with(root: Path, task: str) -> Path:
    text = (root / "server.toml").read_text()
    path = root / "server-test.toml"
    path.write_text(text[: text.index("[task]")] + task)
    return path


def test_the_split_table_is_read_with_its_defaults(root: Path) -> None:
    path = server_with(
        root,
        TASK + "\n[split]\nclient_bottom = 2\nclient_top = 1\nmax_length = 96\n"
        "step_timeout_s = 12.5\nserver_lr = 0.002\nthreads = 1\n",
    )
    task = load_server_config(path).task
    assert task.trains and task.split is not None
    assert task.split == SplitServerConfig(
        client_bottom=2,
        client_top=1,
        max_length=96,
        step_timeout_s=12.5,
        server_lr=0.002,
        threads=1,
    )
    # The server builds the base the adapter names; the embedded one when it names none.
    assert task.split.base == "embedded"
    pretrained = TASK.replace('"embedded"', '"pretrained"') + "\n[split]\n"
    split = load_server_config(server_with(root, pretrained)).task.split
    assert split is not None and split.base == "/models/x"


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (TASK, r'kind = "split" needs a \[split\] table'),
        (
            TASK.replace("local_steps = 2", "local_epochs = 1") + "\n[split]\n",
            "split training counts local_steps",
        ),
        (
            TASK + 'strategy = "scaffold"\n\n[split]\n',
            'task.strategy scaffold is not offered with kind = "split"',
        ),
        (TASK + "\n[split]\nclient_bottom = -1\n", r"client_bottom"),
        (TASK + "\n[split]\nstep_timeout_s = 0\n", r"step_timeout_s"),
        (TASK + "\n[split]\nserver_lr = -0.1\n", r"server_lr"),
        (TASK + '\n[split]\ndevice = "tpu"\n', r"device"),
        (TASK + "\n[split]\nactivation_noise = 0.5\n", r"unknown key\(s\) split\.activation_noise"),
        (
            TASK.replace('"split"', '"train"') + "\n[split]\nclient_bottom = 1\n",
            r"split",
        ),
    ],
)
def test_the_server_refuses_a_bad_split_table(root: Path, task: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(server_with(root, task))


def test_the_institution_sets_its_activation_noise(root: Path) -> None:
    client = root / "client-1" / "client.toml"
    text = client.read_text()
    plain = load_client_config(client)
    assert plain.activation_noise == 0.0
    good = client.with_name("noise.toml")
    good.write_text(text + "\n[split]\nactivation_noise = 0.25\n")
    assert load_client_config(good).activation_noise == 0.25
    for value, message in (("-0.5", "must be >= 0"), ("nan", "activation_noise")):
        bad = client.with_name("bad-noise.toml")
        bad.write_text(text + f"\n[split]\nactivation_noise = {value}\n")
        with pytest.raises(ConfigError, match=message):
            load_client_config(bad)

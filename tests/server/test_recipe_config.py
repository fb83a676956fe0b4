"""The recipe in the deployment: server.toml [task] and client.toml [train] parse into the same
Recipe as the simulate flags, each file taking only the keys its owner decides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.client_config import load_client_config
from fl_core.adapter_io import AdapterConfig, save_adapter
from fl_core.cli import main as fedsec
from fl_core.round_config import TrainTask
from fl_core.toml_config import ConfigError
from secagg.params import SessionShape
from server.config import load_server_config
from server.global_model import GlobalModel

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "d"
    assert fedsec(["keygen", "--out", str(out), "--clients", "3", "--task", "random"]) == 0
    tensors = {A: np.ones((2, 8), np.float32), B: np.zeros((8, 2), np.float32)}
    save_adapter(out / "embedded", tensors, AdapterConfig(2, 4, ("q_proj",)))
    save_adapter(out / "pretrained", tensors, AdapterConfig(2, 4, ("q_proj",), 0.0, "/models/x"))
    return out


def server_with(root: Path, task: str) -> Path:
    text = (root / "server.toml").read_text()
    path = root / "server-test.toml"
    path.write_text(text[: text.index("[task]")] + task)
    return path


def test_the_coordinator_sends_its_recipe_and_the_scheduled_lr(root: Path) -> None:
    path = server_with(
        root,
        '[task]\nkind = "train"\ninitial_adapter = "embedded"\nlr = 0.04\n'
        'lr_schedule = "cosine"\nlocal_epochs = 2\nbatch_size = 4\noptimizer = "sgd"\n'
        'strategy = "fedadam"\n\n[task.strategy_params]\neta = 0.003\n',
    )
    task = load_server_config(path).task
    assert task.recipe.local_epochs == 2 and task.recipe.local_steps is None
    assert task.recipe.params()["eta"] == 0.003
    model = GlobalModel(load_server_config(path))
    rates = []
    for number in range(2):  # the deployment's [rounds] count is 2
        config, _ = model.round_config(number, bytes(32), (1, 2, 3), SessionShape(2, None, 2))
        task = config.task
        assert isinstance(task, TrainTask)
        assert task.local_epochs == 2 and task.local_steps == 0
        assert task.optimizer == "sgd" and task.batch_size == 4
        rates.append(task.learning_rate)
    assert rates == pytest.approx([0.04, 0.02])  # cosine over 2 rounds


def test_defaults_follow_the_adapters_base(root: Path) -> None:
    for adapter, lr in (("embedded", 1e-2), ("pretrained", 1e-3)):
        path = server_with(root, f'[task]\nkind = "train"\ninitial_adapter = "{adapter}"\n')
        assert load_server_config(path).task.recipe.lr == lr


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("lora_rank = 4\n", r"task\.lora_rank cannot be set here: .*client\.toml \[train\]"),
        ("lr = -1\n", r"task\.lr: lr must be > 0"),
        ('strategy = "nonsense"\n', "strategy"),
        ("learning_rate = 0.1\n", r"unknown key\(s\) task\.learning_rate"),
    ],
)
def test_the_server_refuses_what_is_not_its_to_set(root: Path, task: str, message: str) -> None:
    path = server_with(root, f'[task]\nkind = "train"\ninitial_adapter = "embedded"\n{task}')
    with pytest.raises(ConfigError, match=message):
        load_server_config(path)


def test_an_institution_sets_its_own_recipe_keys_only(root: Path) -> None:
    client = root / "client-1" / "client.toml"
    text = client.read_text()
    good = client.with_name("good.toml")
    good.write_text(
        text + '\n[train]\nlora_rank = 4\nlora_targets = ["q_proj", "v_proj"]\n'
        'max_length = 96\ngrad_accum = 2\ndevice = "cpu"\n\n[data]\nsynthetic = "fraud-1"\n'
    )
    train = load_client_config(good).train
    assert train is not None
    assert train.recipe.lora_rank == 4 and train.recipe.lora_targets == ("q_proj", "v_proj")
    assert train.recipe.grad_accum == 2 and train.recipe.lr == 1e-2  # embedded defaults
    bad = client.with_name("bad.toml")
    bad.write_text(text + '\n[train]\nlr = 0.1\n\n[data]\nsynthetic = "fraud-1"\n')
    with pytest.raises(ConfigError, match=r"train\.lr cannot be set here: .*server\.toml \[task\]"):
        load_client_config(bad)

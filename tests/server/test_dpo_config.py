"""A DPO stage in the deployment: the coordinator's [task] names it, every round's task carries
its objective (and the stage's reference by digest), and an institution trains it on its pairs."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from clients.client_config import load_client_config
from clients.synthetic import institution_name
from clients.train_task import LocalTrainer
from fl_core.adapter_io import AdapterConfig, save_adapter
from fl_core.cli import main as fedsec
from fl_core.round_config import TrainTask
from fl_core.toml_config import ConfigError
from secagg.errors import ConfigurationError
from secagg.params import SessionShape
from server.config import load_server_config
from server.global_model import DPO_REFERENCE_FILE, GlobalModel

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "d"
    assert fedsec(["keygen", "--out", str(out), "--clients", "3", "--task", "random"]) == 0
    tensors = {A: np.ones((2, 8), np.float32), B: np.zeros((8, 2), np.float32)}
    save_adapter(out / "adapter", tensors, AdapterConfig(2, 4, ("q_proj",)))
    return out


def server_with(root: Path, task: str, rounds: int = 3) -> Path:
    text = (root / "server.toml").read_text()
    head = text[: text.index("[task]")].replace("count = 2", f"count = {rounds}")
    path = root / "server-dpo.toml"
    path.write_text(head + '[task]\nkind = "train"\ninitial_adapter = "adapter"\n' + task)
    return path


def _round(model: GlobalModel, number: int) -> TrainTask:
    """The train task the coordinator announces for round ``number``."""
    config, _ = model.round_config(number, bytes(32), (1, 2, 3), SessionShape(2, None, 2))
    assert isinstance(config.task, TrainTask)
    return config.task


def test_every_round_names_its_objective_and_the_stage_reference(root: Path) -> None:
    path = server_with(
        root,
        'stage = "sft+dpo"\ndpo_rounds = 2\ndpo_beta = 0.25\ndpo_lr = 0.002\n'
        'dpo_reference = "sft"\n',
    )
    model = GlobalModel(load_server_config(path))
    first = _round(model, 0)
    assert first.objective == "sft" and first.dpo_reference == b""
    model.vector = model.vector + 0.5  # what round 0 released
    second = _round(model, 1)
    assert second.objective == "dpo" and second.dpo_beta == 0.25
    assert second.dpo_loss == "sigmoid" and second.learning_rate == 0.002
    digest = hashlib.sha256(model.vector.astype("<f4").tobytes()).digest()
    assert second.dpo_reference == digest
    model.vector = model.vector + 0.5  # the stage goes on; its reference does not move
    assert _round(model, 2).dpo_reference == digest
    # The digest survives a restart of the coordinator (it sits beside the checkpoints).
    state = root / "dpo-state"
    checkpoint, _ = model.save(state, 1)
    again = GlobalModel(load_server_config(path))
    again.restore(checkpoint)
    assert _round(again, 2).dpo_reference == digest
    # Without it, a restarted coordinator cannot name the reference: it refuses, it does not
    # silently move the reference to the current vector.
    (state / DPO_REFERENCE_FILE).unlink()
    lost = GlobalModel(load_server_config(path))
    lost.restore(checkpoint)
    with pytest.raises(ConfigError, match=r"reference digest .* is missing"):
        _round(lost, 2)


def test_the_round_reference_needs_no_digest(root: Path) -> None:
    path = server_with(root, 'stage = "dpo"\ndpo_reference = "round"\ndpo_loss = "ipo"\n')
    config = _round(GlobalModel(load_server_config(path)), 0)
    assert config.objective == "dpo" and config.dpo_loss == "ipo"
    assert config.dpo_reference == b""


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ('stage = "sft+dpo"\ndpo_rounds = 3\n', r"task.stage: stage sft\+dpo over 3 rounds"),
        ('stage = "dpo"\ndpo_rounds = 1\n', r"dpo_rounds splits the rounds of stage sft\+dpo"),
        ('stage = "ppo"\n', r"task.stage: stage must be one of sft, dpo, sft\+dpo"),
    ],
)
def test_the_coordinator_refuses_a_stage_that_cannot_run(
    root: Path, task: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(server_with(root, task))


CLIENT_TRAIN = """
[train]
institutions = 4
records = 16
lora_rank = 2
lora_alpha = 4
max_length = 64
threads = 1
"""


def _client(root: Path, extra: str) -> Path:
    path = root / "client-1" / "client-dpo.toml"
    text = (root / "client-1" / "client.toml").read_text()
    path.write_text(text + extra)
    return path


def test_an_institution_refuses_dpo_settings_in_its_own_file(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"coordinator's: set it in server\.toml"):
        load_client_config(
            _client(root, CLIENT_TRAIN + 'dpo_beta = 0.2\n[data]\nsynthetic = "x"\n')
        )


@pytest.fixture(scope="module")
def trainer(root: Path) -> LocalTrainer:
    name = institution_name(0)
    return LocalTrainer(
        load_client_config(_client(root, CLIENT_TRAIN + f'[data]\nsynthetic = "{name}"\n'))
    )


def _dpo_task(trainer: LocalTrainer, reference: bytes = b"") -> TrainTask:
    return TrainTask(
        seed=3,
        local_steps=2,
        batch_size=4,
        learning_rate=0.01,
        max_weight=1000,
        layout_fingerprint=trainer.lm.layout.fingerprint(),
        objective="dpo",
        dpo_beta=0.1,
        dpo_loss="sigmoid",
        dpo_reference=reference,
    )


def test_an_embedded_institution_trains_its_pairs_on_a_dpo_round(trainer: LocalTrainer) -> None:
    start = trainer.lm.get_vector()
    model = start.astype("<f4").tobytes()
    result = trainer.local_update(_dpo_task(trainer), model)
    assert trainer.pairs is not None and result.num_samples == len(trainer.pairs) == 64
    assert np.abs(result.delta).max() > 0 and result.mean_loss < 0.7
    # The stage's first round: the reference is the vector this round sent, kept for later.
    digest = hashlib.sha256(model).digest()
    trainer.local_update(_dpo_task(trainer, digest), model)
    moved = (start + 0.01).astype("<f4").tobytes()
    later = trainer.local_update(_dpo_task(trainer, digest), moved)
    assert later.mean_loss != pytest.approx(np.log(2), abs=1e-4)  # policy != reference
    with pytest.raises(ConfigurationError, match="did not receive"):
        trainer.local_update(_dpo_task(trainer, b"\x01" * 32), moved)
    odd = dataclasses.replace(_dpo_task(trainer), objective="ppo")
    with pytest.raises(ConfigurationError, match="objective 'ppo'"):
        trainer.local_update(odd, model)
    odd = dataclasses.replace(odd, objective="dpo", dpo_loss="hinge")
    with pytest.raises(ConfigurationError, match="DPO loss 'hinge'"):
        trainer.local_update(odd, model)


def test_a_client_without_pairs_refuses_a_dpo_round(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n' * 4)
    config = load_client_config(_client(root, CLIENT_TRAIN + f'[data]\njsonl = "{data}"\n'))
    trainer = LocalTrainer(config)
    with pytest.raises(ConfigurationError, match="no preference pairs: set \\[data\\] preference"):
        trainer.local_update(_dpo_task(trainer), trainer.lm.get_vector().tobytes())

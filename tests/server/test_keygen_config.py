"""`fedsec keygen` output and the TOML config loaders that read it."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
import torch
from cryptography import x509
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clients.client_config import load_client_config
from clients.train_task import LocalTrainer
from fl_core.cli import UsageError, main
from fl_core.toml_config import ConfigError
from secagg.params import SessionShape
from server import keygen_cli
from server.config import default_workers, load_server_config
from server.keygen_cli import BASE_MODEL, INITIAL_ADAPTER
from wire.credentials import load_identity, load_roster


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "d"
    assert main(["keygen", "--out", str(out), "--clients", "4"]) == 0
    return out


def test_bundle_configs_load_and_identities_match_the_roster(bundle: Path) -> None:
    server = load_server_config(bundle / "server.toml")
    assert sorted(server.roster) == [1, 2, 3, 4]
    assert server.rounds.cohort_size == 4 and server.rounds.threshold == 0  # derived per round
    assert server.rounds.session_shape(4).threshold == 3 and server.rounds.corrupt_fraction == 0.05
    for client_id in (1, 2, 3, 4):
        client = load_client_config(bundle / f"client-{client_id}" / "client.toml")
        assert client.client_id == client_id
        assert client.identity.public_bytes == server.roster[client_id]
        key_file = bundle / f"client-{client_id}" / "identity.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_server_certificate_is_issued_by_the_dev_ca_for_the_hosts(bundle: Path) -> None:
    ca = x509.load_pem_x509_certificate((bundle / "pki/ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((bundle / "pki/server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE((bundle / "pki/ca.key").stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_a_deployment(bundle: Path) -> None:
    with pytest.raises(UsageError, match="refusing to overwrite"):
        keygen_cli.run(
            argparse.Namespace(
                out=bundle, clients=3, host=None, port=1, identity=None, id=None, name=None
            )
        )


def test_single_identity_prints_a_roster_entry_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "me.key"
    assert main(["keygen", "--identity", str(key), "--id", "42", "--name", 'St "A"']) == 0
    entry = capsys.readouterr().out
    roster_file = tmp_path / "roster.toml"
    roster_file.write_text(entry)
    roster, names = load_roster(roster_file)
    assert roster[42] == load_identity(key).public_bytes
    assert names[42] == 'St "A"'
    assert main(["keygen", "--identity", str(key), "--id", "42"]) == 2  # no overwrite


def _edit(bundle: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = (bundle / "server.toml").read_text()
    assert old in text
    path = bundle / f"edited-{tmp_path.name}.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("ring_bits = 32", "ring_bits = 32\ntreshold = 3", r"unknown key\(s\) rounds.treshold"),
        ("count = 3", "count = 3\nbogus = 1", r"unknown key\(s\) rounds.bogus"),
        ("ring_bits = 32", "ring_bits = 32\nthreshold = 5", r"of 4: threshold 5 exceeds"),
        ("corrupt_fraction = 0.05", "corrupt_fraction = 1.5", r"must be in \[0, 1\)"),
        ("cohort_size = 4", "cohort_size = 9", r"exceeds the 4 institutions"),
        ("ring_bits = 32", "ring_bits = 65", r"rounds.ring_bits must be <= 64"),
        ("count = 3", 'count = "3"', r"rounds.count must be an integer"),
        ('kind = "train"', 'kind = "magic"', r"task.kind must be one of random, train"),
        ('roster = "roster.toml"', 'roster = "nope.toml"', r"server.roster: .* does not exist"),
        ("[task]", "[task", r"not valid TOML"),
        ('state_dir = "state"', 'state_dir = "state"\nworkers = 0', r"server.workers must be >= 1"),
    ],
)
def test_server_config_errors_name_the_key(
    bundle: Path, tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(_edit(bundle, tmp_path, old, new))


def test_server_workers_default_to_the_cpus_and_can_be_set(bundle: Path, tmp_path: Path) -> None:
    assert load_server_config(bundle / "server.toml").workers == default_workers() >= 1
    edited = _edit(bundle, tmp_path, 'state_dir = "state"', 'state_dir = "state"\nworkers = 3')
    assert load_server_config(edited).workers == 3


def test_roster_with_a_bad_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "roster.toml"
    path.write_text('[[institution]]\nid = 1\npublic_key = "abcd"\n')
    with pytest.raises(ConfigError, match="32 bytes"):
        load_roster(path)
    path.write_text('[[institution]]\nid = 1\npublic_key = "zz"\n')
    with pytest.raises(ConfigError, match="not hex"):
        load_roster(path)


def test_client_config_refuses_a_non_ed25519_identity(bundle: Path, tmp_path: Path) -> None:
    text = (bundle / "client-1" / "client.toml").read_text()
    path = bundle / "client-1" / "bad.toml"
    path.write_text(text.replace('"identity.key"', '"../pki/server.key"'))
    with pytest.raises(ConfigError, match="must be Ed25519"):
        load_client_config(path)


def test_the_server_config_can_raise_the_threshold_never_lower_it(
    bundle: Path, tmp_path: Path
) -> None:
    lowered = load_server_config(
        _edit(bundle, tmp_path, "ring_bits = 32", "ring_bits = 32\nthreshold = 2")
    )
    assert lowered.rounds.session_shape(4).threshold == 3  # the active-server floor for n = 4
    raised = load_server_config(
        _edit(bundle, tmp_path, "ring_bits = 32", "ring_bits = 32\nthreshold = 4")
    )
    assert raised.rounds.session_shape(4).threshold == 4
    sparse = load_server_config(
        _edit(bundle, tmp_path, "ring_bits = 32", "ring_bits = 32\nneighbours = 2")
    )
    # With no corrupt client assumed in 4 (5 %), a 4-cycle with t = 2 is safe: 2t > k + 0 + 1.
    assert sparse.rounds.session_shape(4) == SessionShape(2, 2, 3)
    assert sparse.rounds.session_shape(40).neighbours == 8  # raised to the finder's degree


def test_the_default_bundle_fine_tunes_the_embedded_model(bundle: Path) -> None:
    server = load_server_config(bundle / "server.toml")
    assert server.task.kind == "train" and server.task.initial_adapter == bundle / INITIAL_ADAPTER
    names = set()
    for client_id in (1, 2, 3, 4):
        client = load_client_config(bundle / f"client-{client_id}" / "client.toml")
        assert client.train is not None and client.train.base == "embedded"
        names.add(client.synthetic)
    assert len(names) == 4  # each institution trains on its own synthetic data

    # The saved base is the one the institutions build: the starting adapter on it, in plain
    # PEFT, computes what institution 1's own model computes.
    trainer = LocalTrainer(load_client_config(bundle / "client-1" / "client.toml"))
    base = AutoModelForCausalLM.from_pretrained(bundle / BASE_MODEL)
    model = PeftModel.from_pretrained(base, str(bundle / INITIAL_ADAPTER))
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trainer.lm.model(ids).logits)


def test_task_random_makes_a_protocol_drill(tmp_path: Path) -> None:
    out = tmp_path / "drill"
    assert main(["keygen", "--out", str(out), "--clients", "3", "--task", "random"]) == 0
    assert load_server_config(out / "server.toml").task.kind == "random"
    assert load_client_config(out / "client-1" / "client.toml").train is None
    assert not (out / INITIAL_ADAPTER).exists() and not (out / BASE_MODEL).exists()


def test_train_base_directory_is_relative_to_the_config_file(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = bundle / "client-2" / "client.toml"
    text = config.read_text().replace('base = "embedded"', 'base = "../base-model"')
    edited = bundle / "client-2" / f"relative-{tmp_path.name}.toml"
    edited.write_text(text)
    monkeypatch.chdir(tmp_path)  # somewhere else: the path must not depend on it
    loaded = load_client_config(edited)
    assert loaded.train is not None and loaded.train.base == str((bundle / BASE_MODEL).resolve())
    edited.write_text(text.replace("../base-model", "../no-such-model"))
    with pytest.raises(ConfigError, match=r"train.base: .*no-such-model is not a model directory"):
        load_client_config(edited)

"""The ckks backend without processes: config refusals, the server's session, the runner's
dispatch, the client's refusals (a forged aggregate, a replayed round), the institutions' key
files and the store's backend column."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sqlite3
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest
import tenseal as ts

from clients.client_config import load_client_config
from clients.transport import ClientTransport, random_update
from fl_core.adapter_io import AdapterConfig, save_adapter
from fl_core.cli import main as fedsec
from fl_core.round_config import CkksAggregation, RoundConfig
from fl_core.toml_config import ConfigError
from secagg.errors import TooFewSurvivors, UnexpectedMessage
from secagg.he import (
    DecryptedSum,
    HeClientSession,
    HeServerSession,
    KeyAnnouncement,
    NoDecryptor,
    PublicContext,
    generate_federation_keys,
)
from secagg.he.backend import KIND_AGGREGATE, KIND_UPDATE, Envelope, pack, unpack
from secagg.he.errors import AggregateIntegrityError, ContextMismatch
from secagg.keys import AgreementKeyPair
from server.admission import Refusal
from server.config import load_server_config
from server.outbox import Mailboxes
from server.rounds import RoundRunner, UploadHeader
from server.store import Store
from wire import fedsec_pb2 as pb
from wire.convert import UploadKind, round_config_bytes, round_config_to_pb
from wire.credentials import load_identity
from wire.he_files import (
    CkksShape,
    decode_announcement,
    encode_announcement,
    load_public_context,
    load_secret_context,
)
from wire.he_round import (
    ckks_params_of,
    ckks_spec_of,
    decode_release,
    encode_release,
    he_upload_limit,
)

DIM = 1000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckks") / "d"
    assert (
        fedsec(
            [
                "keygen",
                "--out",
                str(root),
                "--clients",
                "4",
                "--backend",
                "ckks",
                "--task",
                "random",
            ]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def runner(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> RoundRunner:
    config = load_server_config(bundle / "server.toml")
    return RoundRunner(config, Store(tmp_path_factory.mktemp("state") / "s.db"), Mailboxes())


def _round(runner: RoundRunner, cohort: list[int]) -> tuple[HeServerSession, RoundConfig]:
    config, _ = runner._round_config(0, cohort)
    assert runner._config.ckks is not None
    return HeServerSession(runner._config.ckks.public, ckks_spec_of(config)), config


def _client(bundle: Path, client_id: int, config: RoundConfig) -> HeClientSession:
    held = load_secret_context(bundle / f"client-{client_id}" / "he-secret.ctx")
    spec = ckks_spec_of(config)
    return HeClientSession(client_id, held.for_round(spec.params), spec, b"model")


def _uploads(
    bundle: Path, config: RoundConfig, cohort: tuple[int, ...]
) -> tuple[dict[int, HeClientSession], dict[int, bytes]]:
    clients = {c: _client(bundle, c, config) for c in cohort}
    return clients, {c: clients[c].encrypt(random_update(config, c)) for c in cohort}


# --- config -------------------------------------------------------------------------------


def _edit(bundle: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = (bundle / "server.toml").read_text()
    assert old in text
    path = bundle / f"edited-{tmp_path.name}.toml"
    path.write_text(text.replace(old, new))
    return path


def test_unknown_backend_is_refused_naming_file_and_key(bundle: Path, tmp_path: Path) -> None:
    path = _edit(bundle, tmp_path, 'backend = "ckks"', 'backend = "paillier"')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: rounds.backend must be one of")):
        load_server_config(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("min_clients = 4", "min_clients = 4\nthreshold = 3", "unknown key(s) rounds.threshold"),
        ("min_clients = 4", "min_clients = 2", "ckks.min_contributors (3) must be <="),
        ("min_contributors = 3", "min_contributors = 3\nscale_bits = 30", "other CKKS parameters"),
        ("[ckks]\n", "[ckks]\nwho = 1\n", "unknown key(s) ckks.who"),
        (
            'public_context = "he/public-context.bin"',
            'public_context = "client-2/he-secret.ctx"',
            "not a version-1 fedsec public context",
        ),
    ],
)
def test_ckks_config_refusals(
    bundle: Path, tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_server_config(_edit(bundle, tmp_path, old, new))


def test_masking_config_with_a_ckks_table_is_refused(bundle: Path, tmp_path: Path) -> None:
    path = _edit(
        bundle,
        tmp_path,
        'backend = "ckks"',
        'backend = "masking"\nthreshold = 3\nring_bits = 32',
    )
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) ckks")):
        load_server_config(path)


def test_a_public_context_file_holding_the_secret_key_is_refused(bundle: Path) -> None:
    """Even correctly signed by the dealer (its fingerprint announced), a context with the
    secret key in it never loads on the server; a swapped context fails the fingerprint."""
    public_file = (bundle / "he" / "public-context.bin").read_bytes()
    dealer = decode_announcement(public_file[5:], bundle)
    held = load_secret_context(bundle / "client-1" / "he-secret.ctx")
    secret_bytes = bytes(held.context.serialize(save_secret_key=True))
    config = load_server_config(bundle / "server.toml")
    params = config.ckks.public.params if config.ckks else None
    assert params is not None

    swapped = bundle / "swapped.bin"
    swapped.write_bytes(public_file[:169] + secret_bytes)
    with pytest.raises(ConfigError, match="ContextMismatch"):
        load_public_context(swapped, params, config.roster)

    identity = load_identity(bundle / "client-1" / "identity.key")
    signed = KeyAnnouncement.create(
        identity,
        dealer.session_id,
        1,
        AgreementKeyPair.generate(),
        hashlib.sha256(secret_bytes).digest(),
    )
    leaked = bundle / "leaked.bin"
    leaked.write_bytes(public_file[:5] + encode_announcement(signed) + secret_bytes)
    with pytest.raises(ConfigError, match="contains the secret key"):
        load_public_context(leaked, params, config.roster)


# --- the server's round state ---------------------------------------------------------------


def test_uploads_are_added_foreign_ones_refused_and_the_release_applied(
    bundle: Path, runner: RoundRunner
) -> None:
    ckks, config = _round(runner, [1, 2, 3, 4])
    assert config.backend == "ckks" and config.contribution_size == DIM
    clients, uploads = _uploads(bundle, config, (1, 2, 3))
    for c in (1, 2, 3):
        assert len(uploads[c]) <= he_upload_limit(pb.HE_UPDATE, ckks.params, DIM)
        ckks.receive_update(c, uploads[c])
    foreign = generate_federation_keys(CkksShape().key_params())
    foreign_spec = dataclasses.replace(ckks.spec, fingerprint=foreign.fingerprint)
    rogue = HeClientSession(
        4, foreign.secret.for_params(ckks.params), foreign_spec, b"model"
    ).encrypt(random_update(config, 4))
    with pytest.raises(ContextMismatch):
        ckks.receive_update(4, rogue)
    assert ckks.pending == frozenset()  # its only upload failed: no longer awaited
    assert ckks.contributors == (1, 2, 3)

    aggregate = ckks.close_uploads()
    assert ckks.decryptor == 1 and ckks.pending == {1}
    released = clients[1].decrypt(aggregate)
    wire = decode_release(encode_release(ckks.session_id, released), ckks.session_id, DIM)
    with pytest.raises(UnexpectedMessage):
        ckks.receive_release(2, wire)
    ckks.receive_release(1, wire)
    exact = sum(random_update(config, c).astype(np.float64) for c in (1, 2, 3))
    result = ckks.result
    assert result.weight == 3 and result.contributors == 3
    bound = ckks.params.release_step(3) + 4 * np.finfo(np.float32).eps
    assert np.abs(result.total - exact).max() <= bound


def test_too_few_uploads_or_a_lost_decryptor_abort_with_nothing_released(
    bundle: Path, runner: RoundRunner
) -> None:
    few, config = _round(runner, [1, 2, 3, 4])
    _, uploads = _uploads(bundle, config, (1, 2))
    for c in (1, 2):  # min_contributors is 3
        few.receive_update(c, uploads[c])
    with pytest.raises(TooFewSurvivors):
        few.close_uploads()

    # The decryptor is the lowest id of the cohort, fixed before the uploads; if it did not
    # upload the attempt ends at once: no other client is asked (two decryptors of one session
    # could be handed different sums).
    ckks, config = _round(runner, [1, 2, 3, 4])
    _, uploads = _uploads(bundle, config, (2, 3, 4))
    for c in (2, 3, 4):
        ckks.receive_update(c, uploads[c])
    with pytest.raises(NoDecryptor, match="client 1, did not upload"):
        ckks.close_uploads()
    assert ckks.stage.value == "aborted"


def test_a_release_that_miscounts_contributors_is_refused(
    bundle: Path, runner: RoundRunner
) -> None:
    ckks, config = _round(runner, [1, 2, 3])
    _, uploads = _uploads(bundle, config, (1, 2, 3))
    for c in (1, 2, 3):
        ckks.receive_update(c, uploads[c])
    ckks.close_uploads()
    forged = DecryptedSum(np.zeros(DIM, np.float32), 2.0, 2)
    with pytest.raises(AggregateIntegrityError, match="counts 2 contributors"):
        ckks.receive_release(ckks.decryptor, forged)
    assert ckks.stage.value == "aborted"


def test_runner_refuses_uploads_of_the_other_backend_or_from_outside_the_cohort(
    runner: RoundRunner,
) -> None:
    ckks, _ = _round(runner, [1, 2, 3])
    runner._ckks = ckks  # as the round loop installs it
    try:
        header = UploadHeader(0, ckks.session_id, UploadKind.MASKED_INPUT)
        with pytest.raises(Refusal, match="disagree on the backend"):
            runner.upload_limit(1, header)
        header = dataclasses.replace(header, kind=UploadKind.HE_UPDATE)
        with pytest.raises(Refusal, match="not in this cohort") as refused:
            runner.upload_limit(4, header)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert runner.upload_limit(1, header) == he_upload_limit(pb.HE_UPDATE, ckks.params, DIM)
        with pytest.raises(Refusal, match="CiphertextFormatError"):
            runner.deliver(1, header, b"garbage")
    finally:
        runner._ckks = None


def test_train_rounds_under_ckks_send_the_model_vector_and_the_weight_bound(
    bundle: Path, tmp_path: Path
) -> None:
    """Under ckks the round's dim is the model's (the envelope adds the weight slot itself),
    there is no fixed-point scale, and the client derives the weighted parameters from it."""
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": np.ones((2, 8), np.float32),
        "base_model.model.layers.0.q_proj.lora_B.weight": np.zeros((8, 2), np.float32),
    }
    save_adapter(tmp_path / "adapter", tensors, AdapterConfig(2, 4, ("q_proj",)))
    text = (bundle / "server.toml").read_text()
    path = bundle / f"train-{tmp_path.name}.toml"
    path.write_text(
        text.replace(
            'kind = "random"\ndim = 1000',
            f'kind = "train"\ninitial_adapter = "{tmp_path / "adapter"}"\nlora_mode = "ffa"\n'
            "max_weight = 50",
        )
    )
    trainer = RoundRunner(load_server_config(path), Store(tmp_path / "s.db"), Mailboxes())
    config, payload = trainer._round_config(0, [1, 2, 3])
    agg = config.aggregation
    assert isinstance(agg, CkksAggregation)
    assert agg.dim == config.model_dim == 16 and len(payload) == 4 * 16 and agg.weighted
    message = round_config_to_pb(config)  # no masking fields on the wire
    assert message.scale == 0 and message.ring_bits == 0 and not message.HasField("dp")
    params = ckks_params_of(config)
    assert (params.weighted, params.max_weight, params.max_clients) == (True, 50, 3)
    assert params.encoded_dim(agg.dim) == 17


# --- the client -----------------------------------------------------------------------------


def _transport(bundle: Path, client_id: int, backend: str | None = None) -> ClientTransport:
    path = bundle / f"client-{client_id}" / "client.toml"
    if backend == "masking":
        text = path.read_text().replace('backend = "ckks"', 'backend = "masking"')
        path = path.with_name("masking.toml")
        path.write_text(text[: text.index("[ckks]")])
    transport = ClientTransport(load_client_config(path))
    sent: list[int] = []
    payloads: list[bytes] = []

    def send(kind: int, payload: bytes) -> None:
        sent.append(kind)
        payloads.append(payload)

    transport._send = send  # type: ignore[method-assign]
    transport.sent = sent  # type: ignore[attr-defined]
    transport.payloads = payloads  # type: ignore[attr-defined]
    return transport


def test_client_refuses_a_round_of_another_backend_or_key_without_uploading(
    bundle: Path, runner: RoundRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "fedsec.client")
    ckks_config, _ = runner._round_config(0, [1, 2, 3])
    masking_config = pb.RoundConfig(round_number=1, session_id=os.urandom(32), cohort=[1, 2, 3])

    masking_client = _transport(bundle, 2, "masking")
    masking_client._start_round(round_config_bytes(ckks_config), b"")
    ckks_client = _transport(bundle, 2)
    ckks_client._start_round(masking_config.SerializeToString(), b"")
    foreign = round_config_to_pb(ckks_config)
    foreign.ckks.fingerprint = bytes(32)
    ckks_client._start_round(foreign.SerializeToString(), b"")

    for transport in (masking_client, ckks_client):
        assert transport._round is None and transport.sent == []  # type: ignore[attr-defined]
    assert masking_client.stats.rounds_aborted == 1 and ckks_client.stats.rounds_aborted == 2
    text = caplog.text
    assert "uses the ckks backend, this client is configured for masking" in text
    assert "uses the masking backend, this client is configured for ckks" in text
    assert "another federation key" in text

    ckks_client._start_round(round_config_bytes(ckks_config), b"")
    assert ckks_client.sent == [pb.HE_UPDATE]  # type: ignore[attr-defined]


def _scaled(public: PublicContext, config: RoundConfig, upload: bytes, k: int) -> bytes:
    """What a server can make alone: one upload added to itself k times, claimed as 1..k."""
    params = ckks_params_of(config)
    envelope = unpack(upload, params, KIND_UPDATE, config.session_id, config.contribution_size, 1)
    chunks = []
    for chunk in envelope.chunks:
        total = ts.ckks_vector_from(public.context, chunk)
        for _ in range(k - 1):
            total.add_(ts.ckks_vector_from(public.context, chunk))
        chunks.append(bytes(total.serialize()))
    ids = tuple(range(1, k + 1))
    return pack(
        Envelope(
            KIND_AGGREGATE,
            config.session_id,
            envelope.fingerprint,
            envelope.encoded_dim,
            ids,
            tuple(chunks),
        )
    )


def test_the_decryptor_client_releases_the_honest_sum_and_nothing_forged(
    bundle: Path, runner: RoundRunner
) -> None:
    """Through the deployed client: a server that sends client 2's upload three times as the sum
    of clients 1, 2, 3 gets no release (the client leaves the round); the honest sum of the same
    round shape is released; a RoundStart replayed under a used session id is refused."""
    assert runner._config.ckks is not None
    public = runner._config.ckks.public
    transports = {c: _transport(bundle, c) for c in (1, 2, 3)}

    config, payload = runner._round_config(0, [1, 2, 3])
    for t in transports.values():
        t._start_round(round_config_bytes(config), payload)
    uploads = {c: t.payloads[0] for c, t in transports.items()}  # type: ignore[attr-defined]
    forged = _scaled(public, config, uploads[2], 3)
    decryptor = transports[1]
    decryptor._on_he_aggregate(config.session_id, forged)
    assert decryptor.sent == [pb.HE_UPDATE]  # type: ignore[attr-defined]
    assert decryptor._round is None and decryptor.stats.rounds_aborted == 1

    # The same session id again: refused before training, nothing uploaded (the round in
    # flight is dropped, the replay refused: two aborts).
    transports[2]._start_round(round_config_bytes(config), payload)
    assert transports[2].sent == [pb.HE_UPDATE]  # type: ignore[attr-defined]
    assert transports[2].stats.rounds_aborted == 2

    config, payload = runner._round_config(1, [1, 2, 3])
    server = HeServerSession(public, ckks_spec_of(config))
    for c, t in transports.items():
        t._start_round(round_config_bytes(config), payload)
        server.receive_update(c, t.payloads[-1])  # type: ignore[attr-defined]
    decryptor._on_he_aggregate(config.session_id, server.close_uploads())
    assert decryptor.sent[-1] == pb.HE_DECRYPTED_SUM  # type: ignore[attr-defined]
    release = decode_release(decryptor.payloads[-1], config.session_id, DIM)  # type: ignore[attr-defined]
    server.receive_release(1, release)
    exact = sum(random_update(config, c).astype(np.float64) for c in (1, 2, 3))
    assert np.abs(server.result.total - exact).max() <= 1e-6


# --- the institutions' key files ------------------------------------------------------------


def test_he_keys_announce_deal_open_through_files(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configs = {}
    for c in (1, 2, 3):
        text = (bundle / f"client-{c}" / "client.toml").read_text()
        path = bundle / f"client-{c}" / f"{tmp_path.name}.toml"
        path.write_text(text.replace("he-secret.ctx", f"{tmp_path.name}.ctx"))
        configs[c] = str(path)
    assert fedsec(["he-keys", "session"]) == 0
    session = capsys.readouterr().out.strip()
    for c in (2, 3):
        out = str(tmp_path / f"ann-{c}.bin")
        assert (
            fedsec(
                ["he-keys", "announce", "--config", configs[c], "--session", session, "--out", out]
            )
            == 0
        )
    public = tmp_path / "public.bin"
    sealed = tmp_path / "sealed"
    assert (
        fedsec(
            [
                "he-keys",
                "deal",
                "--config",
                configs[1],
                "--session",
                session,
                "--public-out",
                str(public),
                "--sealed-dir",
                str(sealed),
                str(tmp_path / "ann-2.bin"),
                str(tmp_path / "ann-3.bin"),
            ]
        )
        == 0
    )
    # Client 2 cannot open what was sealed to client 3.
    assert (
        fedsec(
            ["he-keys", "open", "--config", configs[2], "--sealed", str(sealed / "sealed-3.bin")]
        )
        == 2
    )
    assert "sealed for client 3, this is client 2" in capsys.readouterr().err
    for c in (2, 3):
        assert (
            fedsec(
                [
                    "he-keys",
                    "open",
                    "--config",
                    configs[c],
                    "--sealed",
                    str(sealed / f"sealed-{c}.bin"),
                ]
            )
            == 0
        )

    server = load_server_config(bundle / "server.toml")
    assert server.ckks is not None
    loaded = load_public_context(public, server.ckks.public.params, server.roster)
    for c in (1, 2, 3):
        secret = bundle / f"client-{c}" / f"{tmp_path.name}.ctx"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert load_secret_context(secret).fingerprint == loaded.fingerprint
        assert not (secret.parent / f"{secret.name}.agreement").exists()
    assert not loaded.context.is_private()


# --- the store ------------------------------------------------------------------------------


def test_a_version_1_state_database_is_migrated_and_reads_as_masking(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE rounds (attempt INTEGER PRIMARY KEY AUTOINCREMENT,
        round_number INTEGER NOT NULL, session_id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
        cohort TEXT NOT NULL, contributors TEXT, reason TEXT, checkpoint TEXT,
        started_at REAL NOT NULL, ended_at REAL);
        INSERT INTO rounds VALUES (1, 0, 'ab', 'completed', '1,2', '1,2', NULL, 'c', 1.0, 2.0);
        PRAGMA user_version = 1;"""
    )
    db.close()
    readonly = Store(path, readonly=True)  # `fedsec status` before the server migrated it
    assert [r.backend for r in readonly.rounds()] == ["masking"]
    readonly.close()
    store = Store(path)
    attempt = store.begin_round(1, os.urandom(32), (1, 2), "ckks")
    assert [r.backend for r in store.rounds()] == ["masking", "ckks"]
    assert store.attempt(attempt).backend == "ckks"
    store.close()

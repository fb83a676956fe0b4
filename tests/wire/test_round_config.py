"""The round config at the edge: the message and the domain object convert into each other
without loss, the conversion refuses what a client must refuse, and a client still binds the
bytes it received, not what they convert to."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from clients.client_config import load_client_config
from clients.transport import ClientTransport
from fl_core.cli import main as fedsec
from fl_core.errors import RoundConfigError
from fl_core.round import RoundCodec
from fl_core.round_config import (
    CkksAggregation,
    CkksRound,
    MaskingRound,
    RandomTask,
    RoundConfig,
    SplitTask,
    TrainTask,
)
from fl_core.split import SplitSpec
from secagg.dp.encoder import DpParams
from secagg.dp.noise import NoiseSpec
from secagg.encoding import QuantizationParams
from secagg.errors import ConfigurationError
from secagg.messages import AdvertiseKeys, decode_message
from secagg.params import SessionShape
from server.config import load_server_config
from server.outbox import Mailboxes
from server.rounds import RoundRunner
from server.store import Store
from wire import fedsec_pb2 as pb
from wire.convert import backend_name, round_config_bytes, round_config_from_pb, round_config_to_pb
from wire.framing import WireFormatError

COHORT = (1, 2, 3)
SHAPE = SessionShape(3, None, 3)
TRAIN = TrainTask(
    seed=7,
    local_steps=2,
    learning_rate=0.01,
    batch_size=4,
    max_weight=50,
    layout_fingerprint="f" * 16,
    local_epochs=1,
    optimizer="sgd",
    max_grad_norm=1.0,
    strategy="scaffold",
    prox_mu=0.1,
    server_control=True,
    objective="dpo",
    dpo_beta=0.1,
    dpo_loss="sigmoid",
    dpo_reference=bytes(range(32)),
)


def _plain(weighted: bool) -> RoundCodec:
    quant = QuantizationParams.fit(
        32, 1.0, len(COHORT), TRAIN.max_weight if weighted else 1, weighted=weighted
    )
    return RoundCodec(16, quant=quant)


def _dp() -> RoundCodec:
    noise = NoiseSpec("skellam", 3.5)
    params = DpParams(32, 16, 1.0, 64.0, noise, os.urandom(32), max_clients=3, beta=0.2)
    return RoundCodec(16, dp=params)


CKKS = CkksRound(8192, (60, 40, 60), 40, 2, bytes(32))

CONFIGS = {
    "masking, random": RoundConfig(
        0, os.urandom(32), COHORT, MaskingRound(SHAPE, _plain(False)), RandomTask(11)
    ),
    "masking, random, seed 0": RoundConfig(
        0, os.urandom(32), COHORT, MaskingRound(SHAPE, _plain(False)), RandomTask(0)
    ),
    "masking weighted, train": RoundConfig(
        3, os.urandom(32), COHORT, MaskingRound(SHAPE, _plain(True), 2), TRAIN, 8
    ),
    "masking, empty train task": RoundConfig(
        1, os.urandom(32), COHORT, MaskingRound(SHAPE, _plain(False)), TrainTask(), 16
    ),
    "masking SecAgg+, DP, split": RoundConfig(
        5,
        os.urandom(32),
        COHORT,
        MaskingRound(SessionShape(3, 2, 3), _dp(), 3),
        SplitTask(TRAIN, SplitSpec(1, 1), 64, 32, 12.5, 30.0),
        16,
    ),
    "ckks, random": RoundConfig(
        2, os.urandom(32), COHORT, CkksAggregation(CKKS, 1.0, 16, False), RandomTask(3)
    ),
    "ckks weighted, train": RoundConfig(
        2, os.urandom(32), COHORT, CkksAggregation(CKKS, 0.5, 16, True), TRAIN, 16
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_config_survives_the_wire_exactly(name: str) -> None:
    config = CONFIGS[name]
    data = round_config_bytes(config)
    received = round_config_from_pb(pb.RoundConfig.FromString(data))
    assert received == config
    # And the bytes the coordinator sends are what the received config re-encodes to.
    assert round_config_bytes(received) == data


def test_the_train_task_has_the_messages_fields() -> None:
    # The conversion copies fields by name: a field added on one side only is caught here.
    domain = {f.name for f in dataclasses.fields(TrainTask)}
    assert domain == set(pb.TrainTask.DESCRIPTOR.fields_by_name)


def test_every_field_of_the_round_config_reaches_the_domain() -> None:
    # Each field a coordinator sets changes the converted config (none is dropped silently).
    base = round_config_to_pb(CONFIGS["masking weighted, train"])
    seen = round_config_from_pb(base)
    for field, value in {
        "round_number": 4,
        "session_id": os.urandom(32),
        "threshold": 2,
        "neighbours": 2,
        "quorum": 2,
        "min_survivors": 3,
        "model_dim": 9,
        "contribution_dim": 15,
        "clip": 0.5,
        "scale": base.scale / 2,
    }.items():
        changed = pb.RoundConfig()
        changed.CopyFrom(base)
        setattr(changed, field, value)
        assert round_config_from_pb(changed) != seen, field


def _message(name: str) -> pb.RoundConfig:
    return round_config_to_pb(CONFIGS[name])


def test_the_conversion_refuses_what_a_client_must_refuse() -> None:
    unknown_backend = _message("masking, random")
    unknown_backend.backend = 7  # type: ignore[assignment]  # proto3 keeps unknown values
    assert backend_name(unknown_backend) == "unknown (7)"
    no_task = _message("masking, random")
    no_task.ClearField("random")
    ckks_without_params = _message("ckks, random")
    ckks_without_params.ClearField("ckks")
    masking_with_ckks = _message("masking, random")
    masking_with_ckks.ckks.CopyFrom(_message("ckks, random").ckks)
    ckks_with_dp = _message("ckks, random")
    ckks_with_dp.dp.CopyFrom(_message("masking SecAgg+, DP, split").dp)
    unknown_mechanism = _message("masking SecAgg+, DP, split")
    unknown_mechanism.dp.mechanism = "laplace"
    for message in (
        unknown_backend,
        no_task,
        ckks_without_params,
        masking_with_ckks,
        ckks_with_dp,
        unknown_mechanism,
    ):
        with pytest.raises(WireFormatError):
            round_config_from_pb(message)

    weighted_random = _message("masking, random")
    weighted_random.weighted = True
    weighted_random.dim += 1
    no_ring = _message("masking, random")
    no_ring.ring_bits = 0
    for message in (weighted_random, no_ring):
        with pytest.raises(ConfigurationError):
            round_config_from_pb(message)
    with pytest.raises(DecodeError):
        pb.RoundConfig.FromString(b"\xff\xff")


def test_a_config_whose_parts_contradict_each_other_cannot_be_announced() -> None:
    config = CONFIGS["masking weighted, train"]
    with pytest.raises(RoundConfigError, match="sized for 3 clients"):
        dataclasses.replace(config, cohort=(1, 2, 3, 4))
    with pytest.raises(RoundConfigError, match="max_weight"):
        dataclasses.replace(config, task=dataclasses.replace(TRAIN, max_weight=60))
    with pytest.raises(RoundConfigError, match="weighted round needs a train"):
        dataclasses.replace(config, task=RandomTask(1))
    with pytest.raises(RoundConfigError, match="not a masking round"):
        CONFIGS["ckks, random"].plan()


# --- the client binds the bytes it received ---------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("masking") / "d"
    args = ["keygen", "--out", str(root), "--clients", "3", "--task", "random"]
    assert fedsec(args) == 0
    return root


def _advert(bundle: Path, client_id: int, config_bytes: bytes) -> AdvertiseKeys:
    """The first message a client sends for a RoundStart carrying ``config_bytes``."""
    transport = ClientTransport(load_client_config(bundle / f"client-{client_id}" / "client.toml"))
    sent: list[bytes] = []
    transport._send = lambda kind, payload: sent.append(payload)  # type: ignore[method-assign]
    transport._start_round(config_bytes, b"")
    assert transport._round is not None, transport._last_refusal
    message = decode_message(sent[0])
    assert isinstance(message, AdvertiseKeys)
    return message


def test_a_client_signs_the_bytes_it_received_not_their_conversion(
    bundle: Path, tmp_path: Path
) -> None:
    """A coordinator shows client 3 a config that converts to the same round but differs in
    its bytes: here the retired field 8 (the server-chosen graph seed, which the conversion
    ignores). Client 3's advertised context differs from the others', so the consistency
    check fails and the round aborts; a client that hashed the converted config would not see
    the difference."""
    runner = RoundRunner(
        load_server_config(bundle / "server.toml"), Store(tmp_path / "s.db"), Mailboxes()
    )
    config, _ = runner._round_config(0, [1, 2, 3])
    honest = round_config_bytes(config)
    steered = honest + b"\x42\x20" + os.urandom(32)  # field 8, length-delimited, 32 bytes
    assert round_config_from_pb(pb.RoundConfig.FromString(steered)) == config

    digests = {
        1: _advert(bundle, 1, honest).context_digest,
        2: _advert(bundle, 2, honest).context_digest,
        3: _advert(bundle, 3, steered).context_digest,
    }
    assert digests[1] == digests[2] != digests[3]

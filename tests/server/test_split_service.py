"""Split steps over gRPC (TLS, admission tokens) in one process: in turn, deadlines, refusals."""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from clients.data import TokenizedDataset
from clients.model_factory import TinyLlamaSpec, build_tiny_llama
from clients.split.middle import MiddleServer, MiddleSettings
from clients.split.model import SplitModel
from clients.split.trainer import InProcessLink, split_train_local
from clients.split.transport import GrpcSplitLink, SplitStepTimeout, SplitStreamRefused
from clients.trainer import LocalResult, LoraModel, LoraSettings, TrainSettings
from fl_core.round import RoundCodec
from fl_core.round_config import MaskingRound, RoundConfig, SplitTask, TrainTask
from fl_core.split import SplitSpec
from secagg.encoding import QuantizationParams
from secagg.keys import Identity, Roster
from secagg.params import SessionShape
from server.admission import Admission
from server.outbox import Mailboxes
from server.service import CoordinatorService
from server.split_service import SplitService
from wire import fedsec_pb2 as pb
from wire import fedsec_pb2_grpc as pb_grpc
from wire.credentials import make_dev_pki
from wire.framing import grpc_options
from wire.split_wire import tensor_frames

SPEC = TinyLlamaSpec(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
VOCAB, ROWS, WIDTH, STEPS = 40, 3, 8, 2
CERT = hashlib.sha256(b"unused").digest()


def _lm() -> LoraModel:
    return LoraModel(build_tiny_llama(VOCAB, SPEC), LoraSettings(rank=2, alpha=4, init_seed=1))


def _data(seed: int) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    ids = tuple(rng.integers(3, VOCAB, size=int(rng.integers(4, WIDTH + 1))) for _ in range(6))
    return TokenizedDataset(ids, tuple(i.copy() for i in ids), 0)


SETTINGS = TrainSettings(local_steps=STEPS, batch_size=ROWS, lr=0.01, num_threads=None)


class Federation:
    """A TLS gRPC coordinator serving split steps, and admitted tokens for clients 1..3."""

    def __init__(self, tmp: Path, step_timeout_s: float) -> None:
        pki = make_dev_pki(tmp / "pki", ["localhost"], [])
        self.middle = MiddleServer(SplitModel(_lm(), SplitSpec(1, 0)), MiddleSettings(lr=0.01))
        self.service = SplitService(self.middle, step_timeout_s)
        identities = {c: Identity.generate() for c in (1, 2, 3)}
        self.admission = Admission(Roster({c: i.public_bytes for c, i in identities.items()}), CERT)
        self.tokens = {}
        for c, identity in identities.items():
            from wire.convert import admission_signed_bytes

            nonce = self.admission.challenge(c)
            sig = identity.sign(admission_signed_bytes(nonce, CERT, c))
            self.tokens[c] = self.admission.authenticate(c, nonce, CERT, sig)
        runner = SimpleNamespace(split=self.service)
        servicer = CoordinatorService(None, self.admission, Mailboxes(), runner, None)  # type: ignore[arg-type]
        self.server = grpc.server(
            __import__("concurrent.futures").futures.ThreadPoolExecutor(8), options=grpc_options()
        )
        pb_grpc.add_CoordinatorServicer_to_server(servicer, self.server)  # type: ignore[no-untyped-call]
        credentials = grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
        )
        port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()
        channel_credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            channel_credentials,
            options=[*grpc_options(), ("grpc.ssl_target_name_override", "localhost")],
        )
        self.stub: Any = pb_grpc.CoordinatorStub(self.channel)  # type: ignore[no-untyped-call]
        # The round as a client receives it (the secure sum's codec does not matter here).
        codec = RoundCodec(1, quant=QuantizationParams.fit(32, 1.0, 3))
        train = TrainTask(local_steps=STEPS, batch_size=ROWS)
        self.config = RoundConfig(
            4,
            b"s" * 32,
            (1, 2, 3),
            MaskingRound(SessionShape(2, None, 2), codec),
            SplitTask(train, SplitSpec(1, 0), WIDTH, SPEC.hidden_size, step_timeout_s, 0.0),
        )

    def begin(self) -> None:
        limits = self.middle.split.limits(ROWS, WIDTH)
        self.service.begin(4, b"s" * 32, (1, 2, 3), STEPS, limits)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    made: list[Federation] = []

    def make(step_timeout_s: float = 30.0) -> Federation:
        made.append(Federation(tmp_path / str(len(made)), step_timeout_s))
        return made[-1]

    yield make  # type: ignore[misc]
    for f in made:
        f.close()


def _train(client: int, link: Any, start: LoraModel) -> LocalResult:
    model = SplitModel(copy.deepcopy(start), SplitSpec(1, 0))
    settings = TrainSettings(**{**SETTINGS.__dict__, "seed": client})
    result = split_train_local(model, model.client_vector(), _data(client), settings, 0, link)
    if isinstance(link, GrpcSplitLink):
        link.close()
    return result


def test_grpc_steps_reproduce_the_one_process_round(federation: Any) -> None:
    fed: Federation = federation()
    start = _lm()
    fed.begin()
    results: dict[int, LocalResult] = {}

    def run(c: int) -> None:
        results[c] = _train(c, GrpcSplitLink(fed.stub, fed.tokens[c], fed.config, c), start)

    # Clients start in reverse order: the server still serves them in the sorted order.
    threads = [threading.Thread(target=run, args=(c,)) for c in (3, 2, 1)]
    for t in threads:
        t.start()
    phase = fed.service.run_turns(threading.Event())
    for t in threads:
        t.join(60)
    assert phase.finished == (1, 2, 3) and phase.dropped == {}

    # The same round in one process.
    local = MiddleServer(SplitModel(_lm(), SplitSpec(1, 0)), MiddleSettings(lr=0.01))
    local.begin_round([1, 2, 3], STEPS, local.split.limits(ROWS, WIDTH))
    for c in (1, 2, 3):
        want = _train(c, InProcessLink(local, c), start)
        np.testing.assert_array_equal(results[c].delta, want.delta)
    np.testing.assert_array_equal(fed.service.vector(), local.vector())


def test_a_client_lost_mid_step_is_dropped_and_the_turn_passes(
    federation: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fed: Federation = federation(step_timeout_s=1.0)
    fed.begin()
    stalled: list[Any] = []

    def stall() -> None:
        # Client 1 sends its first activation, then never its gradient (a process that hung).
        frames = [
            pb.SplitUp(open=pb.SplitOpen(token=fed.tokens[1], round_number=4, session_id=b"s" * 32))
        ]
        hidden = np.zeros((2, 5, SPEC.hidden_size), dtype=np.float32)
        frames += list(tensor_frames(pb.SplitUp, 0, pb.BOTTOM_ACTIVATION, hidden, [5, 4]))
        gate = threading.Event()

        def requests() -> Iterator[pb.SplitUp]:
            yield from frames
            gate.wait(30)

        call = fed.stub.SplitSteps(requests(), timeout=30)
        stalled.append(call)
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            stalled.append(exc)
        gate.set()

    results: dict[int, LocalResult] = {}

    def run(c: int) -> None:
        results[c] = _train(c, GrpcSplitLink(fed.stub, fed.tokens[c], fed.config, c), _lm())

    threads = [threading.Thread(target=stall)]
    threads += [threading.Thread(target=run, args=(c,)) for c in (2, 3)]
    with caplog.at_level(logging.WARNING, logger="fedsec.server"):
        for t in threads:
            t.start()
        phase = fed.service.run_turns(threading.Event())
        for t in threads:
            t.join(60)
    assert phase.finished == (2, 3)
    assert "lost mid-step 0: no gradient within 1 s" in phase.dropped[1]
    assert "client 1 dropped from split training: lost mid-step 0" in caplog.text
    assert set(results) == {2, 3}
    error = stalled[-1]
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "lost mid-step 0" in (error.details() or "")


def test_a_client_whose_turn_never_comes_leaves_with_a_clear_error(federation: Any) -> None:
    fed: Federation = federation(step_timeout_s=0.2)
    fed.begin()  # nobody serves the turns (no run_turns): client 2 waits behind client 1
    link = GrpcSplitLink(fed.stub, fed.tokens[2], fed.config, 2)
    with pytest.raises(SplitStepTimeout, match="round 4: no turn from the server within 1 s"):
        link.wait_for_turn()


@pytest.mark.parametrize(
    ("opening", "code", "reason"),
    [
        ({"round_number": 3}, grpc.StatusCode.FAILED_PRECONDITION, "current one is round 4"),
        ({"session_id": b"x" * 32}, grpc.StatusCode.FAILED_PRECONDITION, "session"),
        ({"token": b"forged"}, grpc.StatusCode.UNAUTHENTICATED, "unknown or superseded"),
    ],
)
def test_streams_outside_the_round_are_refused(
    federation: Any, opening: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    fed: Federation = federation()
    fed.begin()
    fields = {"token": fed.tokens[1], "round_number": 4, "session_id": b"s" * 32, **opening}
    call = fed.stub.SplitSteps(iter([pb.SplitUp(open=pb.SplitOpen(**fields))]), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() is code and reason in (caught.value.details() or "")


def test_a_tensor_beyond_the_round_limits_is_refused_before_allocation(federation: Any) -> None:
    fed: Federation = federation()
    fed.begin()
    opening = pb.SplitUp(
        open=pb.SplitOpen(token=fed.tokens[1], round_number=4, session_id=b"s" * 32)
    )
    # Declares 1 GiB and sends nothing: the header alone is refused.
    huge = pb.SplitUp(
        tensor=pb.TensorHeader(
            step=0,
            kind=pb.BOTTOM_ACTIVATION,
            shape=[ROWS, 1 << 20, SPEC.hidden_size],
            lengths=[1 << 20] * ROWS,
            payload_size=4 * ROWS * (1 << 20) * SPEC.hidden_size,
        )
    )
    call = fed.stub.SplitSteps(iter([opening, huge]), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens per row, a step carries 1 to 8" in (caught.value.details() or "")
    assert 1 in fed.middle.round.dropped  # type: ignore[union-attr]


def test_a_second_stream_of_one_institution_is_refused(federation: Any) -> None:
    fed: Federation = federation()
    fed.begin()
    first = GrpcSplitLink(fed.stub, fed.tokens[2], fed.config, 2)  # waits for its turn
    for _ in range(100):
        if 2 in fed.service._streams:
            break
        threading.Event().wait(0.05)
    second = GrpcSplitLink(fed.stub, fed.tokens[2], fed.config, 2)
    with pytest.raises(SplitStreamRefused, match="ALREADY_EXISTS"):
        second.wait_for_turn()
    first.close()

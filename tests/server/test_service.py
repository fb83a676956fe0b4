"""The coordinator's gRPC face in one process (no sockets): what a client polls after a round
starts and aborts, and the uploads it refuses, exactly as a client sees them (frames, status
codes, messages). The servicer is called as gRPC calls it, with a stand-in context."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import grpc
import pytest

from secagg.protocol import ServerSession
from server.admission import Admission
from server.config import load_server_config
from server.outbox import HeAggregate, Item, Mailboxes, Queued, RoundEnd, RoundStart, SecAggMessage
from server.rounds import RoundRunner, UploadHeader
from server.service import CoordinatorService, server_item_to_pb, upload_header_from_pb
from server.store import Store
from wire import fedsec_pb2 as pb
from wire.convert import UploadKind, admission_signed_bytes, round_config_from_pb
from wire.credentials import load_identity
from wire.framing import client_frames, read_item

CERT = b"c" * 32


class Aborted(Exception):
    """What grpc's ``context.abort`` raises to end the call."""


class Context:
    """The parts of a gRPC servicer context the service uses."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.aborted = (code, details)
        raise Aborted(details)


@dataclasses.dataclass
class Coordinator:
    service: CoordinatorService
    runner: RoundRunner
    tokens: dict[int, bytes]


@pytest.fixture
def coordinator(random_bundle: Path, tmp_path: Path) -> Iterator[Coordinator]:
    """A servicer and its runner, clients 1..3 admitted; a round's first stage closes at once."""
    config = load_server_config(random_bundle / "server.toml")
    config = dataclasses.replace(
        config, rounds=dataclasses.replace(config.rounds, join_timeout_s=0.05)
    )
    store = Store(tmp_path / "s.db")
    mailboxes = Mailboxes()
    runner = RoundRunner(config, store, mailboxes)
    admission = Admission(config.roster, CERT)
    service = CoordinatorService(config, admission, mailboxes, runner, store)
    tokens = {}
    for c in (1, 2, 3):
        identity = load_identity(random_bundle / f"client-{c}" / "identity.key")
        nonce = service.Challenge(pb.ChallengeRequest(client_id=c), Context()).nonce
        request = pb.AuthenticateRequest(
            client_id=c,
            nonce=nonce,
            server_cert_sha256=CERT,
            signature=identity.sign(admission_signed_bytes(nonce, CERT, c)),
        )
        reply = service.Authenticate(request, Context())
        assert reply.next_seq == 0
        tokens[c] = reply.token
    yield Coordinator(service, runner, tokens)
    runner.stop()


def _poll(coordinator: Coordinator, client: int, seq: int) -> tuple[list[pb.ServerFrame], bytes]:
    request = pb.PollRequest(token=coordinator.tokens[client], seq=seq, wait_ms=0)
    frames = list(coordinator.service.Poll(request, Context()))
    _, payload = read_item(iter(frames), lambda item: 1 << 30)
    return frames, payload


def test_every_cohort_member_polls_the_same_round_start_then_the_round_end(
    coordinator: Coordinator,
) -> None:
    for c in (1, 2, 3):  # polling: online
        _poll(coordinator, c, 0)
    reason = coordinator.runner._run_attempt(0, random.Random(0))
    assert isinstance(reason, str) and reason.startswith("TooFewSurvivors")  # nobody answered

    starts = {c: _poll(coordinator, c, 0) for c in (1, 2, 3)}
    config_bytes = starts[1][0][0].item.round_start.config
    config = round_config_from_pb(pb.RoundConfig.FromString(config_bytes))
    assert config.round_number == 0 and config.cohort == (1, 2, 3)
    model = starts[1][1]
    assert len(model) == 4 * config.model_dim
    for c, (frames, payload) in starts.items():
        # The exact bytes every member hashes into what it signs, and the same model.
        assert frames[0] == pb.ServerFrame(
            item=pb.ServerItem(
                seq=0, round_start=pb.RoundStart(config=config_bytes), payload_size=len(model)
            )
        ), c
        assert payload == model
        assert all(f.WhichOneof("body") == "chunk" for f in frames[1:])

    for c in (1, 2, 3):
        frames, payload = _poll(coordinator, c, 1)
        end = pb.RoundEnd(round_number=0, reason=reason)
        assert frames == [pb.ServerFrame(item=pb.ServerItem(seq=1, round_end=end))]
        assert payload == b""
        # Nothing more: an idle item at the asked-for number.
        idle = pb.ServerItem(seq=2, idle=pb.Idle())
        assert _poll(coordinator, c, 2)[0] == [pb.ServerFrame(item=idle)]


def _submit(
    coordinator: Coordinator, client: int, session_id: bytes, kind: int, payload: bytes
) -> tuple[grpc.StatusCode, str] | None:
    header = pb.SubmitHeader(
        token=coordinator.tokens[client],
        round_number=0,
        session_id=session_id,
        kind=kind,  # type: ignore[arg-type]
    )
    context = Context()
    try:
        coordinator.service.Submit(client_frames(header, payload), context)
    except Aborted:
        assert context.aborted is not None
    return context.aborted


def test_uploads_are_refused_at_the_edge_with_the_loops_status_and_message(
    coordinator: Coordinator,
) -> None:
    runner = coordinator.runner
    config, _ = runner._round_config(0, [1, 2])
    session = ServerSession(config.plan().secagg_params(), runner._config.roster, False)
    runner._session = session
    runner._attempt = runner._store.begin_round(0, config.session_id, config.cohort, "masking")
    current = config.session_id
    try:
        stale = _submit(coordinator, 1, bytes(32), pb.MASKED_INPUT, b"x")
        assert stale is not None and stale[0] == grpc.StatusCode.FAILED_PRECONDITION
        assert stale[1].endswith("(stale or replayed)")
        assert _submit(coordinator, 1, current, 42, b"x") == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown message kind 42",
        )
        assert _submit(coordinator, 3, current, pb.MASKED_INPUT, b"x") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "client 3 is not in this cohort",
        )
        oversize = _submit(coordinator, 1, current, pb.ROUND_REFUSAL, b"r" * 1025)
        assert oversize == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "declared payload of 1025 bytes exceeds the 1024 bytes allowed",
        )
        malformed = _submit(coordinator, 1, current, pb.MASKED_INPUT, b"x")
        assert malformed is not None and malformed[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert malformed[1].startswith("malformed message: ")
        assert 2 in session.pending
        assert _submit(coordinator, 2, current, pb.ROUND_REFUSAL, b"not today") is None
        assert 2 not in session.pending
        assert runner._store.refusals(runner._attempt) == [(2, "not today")]
    finally:
        runner._session = None
        runner._attempt = None


def test_each_queued_item_becomes_its_server_item_with_the_outboxs_number() -> None:
    sid = b"s" * 32
    cases: dict[Item, pb.ServerItem] = {
        RoundStart(b"config bytes"): pb.ServerItem(
            seq=5, round_start=pb.RoundStart(config=b"config bytes")
        ),
        SecAggMessage(sid): pb.ServerItem(seq=5, secagg=pb.SecAggItem(session_id=sid)),
        HeAggregate(sid): pb.ServerItem(seq=5, he_aggregate=pb.HeAggregate(session_id=sid)),
        RoundEnd(3, completed=True): pb.ServerItem(
            seq=5, round_end=pb.RoundEnd(round_number=3, completed=True)
        ),
        RoundEnd(3, reason="why", final=True): pb.ServerItem(
            seq=5, round_end=pb.RoundEnd(round_number=3, reason="why", final=True)
        ),
        # An aborted round's end carries no field but its number: still a RoundEnd on the wire.
        RoundEnd(0): pb.ServerItem(seq=5, round_end=pb.RoundEnd()),
    }
    for item, expected in cases.items():
        converted = server_item_to_pb(Queued(5, item, b"payload"))
        assert converted.SerializeToString() == expected.SerializeToString(), item
        assert converted.WhichOneof("kind") == expected.WhichOneof("kind"), item


def test_an_upload_header_keeps_what_the_client_declared_but_its_token() -> None:
    header = pb.SubmitHeader(token=b"t" * 48, round_number=7, session_id=b"s" * 32, payload_size=9)
    header.kind = 42  # type: ignore[assignment]  # proto3 enums are open: an unknown kind stays
    assert upload_header_from_pb(header) == UploadHeader(7, b"s" * 32, 42)
    header.kind = pb.HE_UPDATE
    assert upload_header_from_pb(header).kind == UploadKind.HE_UPDATE

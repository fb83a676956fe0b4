"""The round loop's checks on every upload, without processes: a masking round installed as the
loop installs it, and uploads that must each be refused before allocation (a stale or foreign
session, an unknown kind, a client outside the cohort) or after (a malformed payload, a sender
or kind that is not the header's), with the gRPC status and message a client sees."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from secagg.messages import ConsistencySignature, encode_message
from secagg.protocol import ServerSession
from server.admission import Refusal
from server.config import load_server_config
from server.outbox import Mailboxes
from server.rounds import RoundRunner, UploadHeader
from server.store import Store
from wire.convert import REFUSAL_MAX_BYTES, UploadKind, upload_limit


@pytest.fixture
def masking(random_bundle: Path, tmp_path: Path) -> Iterator[tuple[RoundRunner, ServerSession]]:
    """A runner with round 0's masking session (cohort 1, 2, 3) installed as the loop does."""
    runner = RoundRunner(
        load_server_config(random_bundle / "server.toml"), Store(tmp_path / "s.db"), Mailboxes()
    )
    config, _ = runner._round_config(0, [1, 2, 3])
    session = ServerSession(config.plan().secagg_params(), runner._config.roster, False)
    runner._session = session
    runner._attempt = runner._store.begin_round(0, config.session_id, config.cohort, "masking")
    yield runner, session
    runner._session = None


def _header(session_id: bytes, kind: int) -> UploadHeader:
    return UploadHeader(round_number=0, session_id=session_id, kind=kind)


def _refused(call: Callable[[], object]) -> Refusal:
    with pytest.raises(Refusal) as refused:
        call()
    return refused.value


def test_a_masking_upload_is_sized_from_the_round_parameters(
    masking: tuple[RoundRunner, ServerSession],
) -> None:
    runner, session = masking
    params = session.params
    limit = runner.upload_limit(1, _header(params.session_id, UploadKind.MASKED_INPUT))
    assert limit == upload_limit(UploadKind.MASKED_INPUT, params.ring_bits, params.dim, 3)
    assert runner.upload_limit(2, _header(params.session_id, UploadKind.ROUND_REFUSAL)) == (
        REFUSAL_MAX_BYTES
    )


def test_uploads_are_refused_in_order_session_then_kind_then_cohort(
    masking: tuple[RoundRunner, ServerSession],
) -> None:
    runner, session = masking
    current = session.params.session_id
    foreign = bytes(32)
    # A stale or replayed session is refused first, whatever else the header says.
    for kind in (UploadKind.MASKED_INPUT, 42, UploadKind.ROUND_REFUSAL, UploadKind.HE_UPDATE):
        stale = _refused(partial(runner.upload_limit, 4, _header(foreign, kind)))
        assert stale.code == grpc.StatusCode.FAILED_PRECONDITION, kind
    stale = _refused(lambda: runner.upload_limit(1, _header(foreign, UploadKind.MASKED_INPUT)))
    assert str(stale) == (
        f"message for session {foreign[:8].hex()}, the current session is "
        f"{current[:8].hex()} (stale or replayed)"
    )
    # An unknown kind, before the cohort.
    unknown = _refused(lambda: runner.upload_limit(4, _header(current, 42)))
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(unknown) == "unknown message kind 42"
    # A CKKS upload in a masking round.
    other = _refused(lambda: runner.upload_limit(1, _header(current, UploadKind.HE_UPDATE)))
    assert other.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "disagree on the backend" in str(other)
    # Outside the cohort, for a protocol message and for a refusal.
    for kind in (UploadKind.MASKED_INPUT, UploadKind.ROUND_REFUSAL):
        outsider = _refused(partial(runner.upload_limit, 4, _header(current, kind)))
        assert outsider.code == grpc.StatusCode.PERMISSION_DENIED
        assert str(outsider) == "client 4 is not in this cohort"


def test_no_round_in_progress_refuses_every_upload(
    masking: tuple[RoundRunner, ServerSession],
) -> None:
    runner, _ = masking
    runner._session = None
    for kind in (UploadKind.MASKED_INPUT, UploadKind.ROUND_REFUSAL, UploadKind.HE_UPDATE):
        idle = _refused(partial(runner.upload_limit, 1, _header(bytes(32), kind)))
        assert idle.code == grpc.StatusCode.FAILED_PRECONDITION
        assert str(idle) == "no round is in progress"


def test_a_delivered_payload_must_be_the_headers_message_from_its_sender(
    masking: tuple[RoundRunner, ServerSession],
) -> None:
    runner, session = masking
    current = session.params.session_id
    header = _header(current, UploadKind.CONSISTENCY_SIGNATURE)
    malformed = _refused(lambda: runner.deliver(1, header, b"not a message"))
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(malformed).startswith("malformed message: ")
    message = encode_message(ConsistencySignature(current, 2, b"s" * 64))
    impostor = _refused(lambda: runner.deliver(1, header, message))
    assert impostor.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(impostor) == "client 1 sent a message claiming sender 2"
    mislabelled = _refused(
        lambda: runner.deliver(2, _header(current, UploadKind.SHARE_KEYS), message)
    )
    assert mislabelled.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(mislabelled) == ("header declares kind 2, payload is ConsistencySignature")
    # The right kind from the right sender reaches the session, which refuses it out of stage.
    early = _refused(lambda: runner.deliver(2, header, message))
    assert early.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(early).startswith("UnexpectedMessage: ")


def test_a_refusal_withdraws_the_client_and_is_recorded(
    masking: tuple[RoundRunner, ServerSession],
) -> None:
    runner, session = masking
    current = session.params.session_id
    assert 3 in session.pending
    stale = _refused(lambda: runner.deliver(3, _header(bytes(32), UploadKind.ROUND_REFUSAL), b"no"))
    assert stale.code == grpc.StatusCode.FAILED_PRECONDITION
    assert 3 in session.pending  # a foreign session's refusal changes nothing
    runner.deliver(3, _header(current, UploadKind.ROUND_REFUSAL), b"budget\x00spent")
    assert 3 not in session.pending
    assert runner._attempt is not None
    assert runner._store.refusals(runner._attempt) == [(3, "budget spent")]

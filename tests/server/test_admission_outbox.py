"""Admission challenge-response and the long-poll outboxes, in one process."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time

import grpc
import pytest

from secagg.keys import Identity, Roster
from secagg.packing import packed_size
from server.admission import Admission, Refusal
from server.outbox import Mailboxes, Outbox, Queued, RoundEnd, RoundStart, SecAggMessage
from wire import fedsec_pb2 as pb
from wire.convert import admission_signed_bytes, upload_limit
from wire.framing import WireFormatError

CERT = hashlib.sha256(b"server certificate").digest()


@pytest.fixture
def setup() -> tuple[Admission, Identity]:
    identity = Identity.generate()
    other = Identity.generate()
    return Admission(Roster({1: identity.public_bytes, 2: other.public_bytes}), CERT), identity


def _sign(identity: Identity, nonce: bytes, client_id: int = 1, cert: bytes = CERT) -> bytes:
    return identity.sign(admission_signed_bytes(nonce, cert, client_id))


def test_valid_response_gets_a_token_that_names_the_client(
    setup: tuple[Admission, Identity],
) -> None:
    admission, identity = setup
    nonce = admission.challenge(1)
    token = admission.authenticate(1, nonce, CERT, _sign(identity, nonce))
    assert admission.client_of(token) == 1
    # Re-admission (a restarted client process) supersedes the old token.
    again = admission.challenge(1)
    admission.authenticate(1, again, CERT, _sign(identity, again))
    with pytest.raises(Refusal) as refused:
        admission.client_of(token)
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED


def _refusal(call: object) -> Refusal:
    assert callable(call)
    with pytest.raises(Refusal) as caught:
        call()
    return caught.value


def test_each_bad_admission_is_refused_with_its_reason(setup: tuple[Admission, Identity]) -> None:
    admission, identity = setup
    unknown = _refusal(lambda: admission.challenge(3))
    assert unknown.code is grpc.StatusCode.PERMISSION_DENIED and "not in the roster" in str(unknown)

    nonce = admission.challenge(1)
    wrong_key = _refusal(
        lambda: admission.authenticate(1, nonce, CERT, _sign(Identity.generate(), nonce))
    )
    assert wrong_key.code is grpc.StatusCode.PERMISSION_DENIED  # permanent: do not retry
    assert "does not verify" in str(wrong_key)
    # The nonce was consumed by the failed attempt: a correct signature over it is now useless.
    replay = _refusal(lambda: admission.authenticate(1, nonce, CERT, _sign(identity, nonce)))
    assert "already used" in str(replay)

    nonce = admission.challenge(1)
    other_cert = hashlib.sha256(b"another server").digest()
    relayed = _refusal(
        lambda: admission.authenticate(
            1, nonce, other_cert, _sign(identity, nonce, cert=other_cert)
        )
    )
    assert "another server certificate" in str(relayed)

    nonce = admission.challenge(1)
    # Client 1's signature presented for client 2 (binds the id).
    swapped = _refusal(lambda: admission.authenticate(2, nonce, CERT, _sign(identity, nonce)))
    assert "nonce was not issued" in str(swapped)
    nonce2 = admission.challenge(2)
    swapped = _refusal(lambda: admission.authenticate(2, nonce2, CERT, _sign(identity, nonce2)))
    assert "does not verify" in str(swapped)


def test_expired_nonce_is_refused() -> None:
    identity = Identity.generate()
    admission = Admission(Roster({1: identity.public_bytes}), CERT, nonce_ttl_s=0.0)
    nonce = admission.challenge(1)
    time.sleep(0.01)
    expired = _refusal(lambda: admission.authenticate(1, nonce, CERT, _sign(identity, nonce)))
    assert "expired" in str(expired)


def test_outbox_long_poll_acknowledges_and_restarts() -> None:
    box = Outbox()
    assert box.get(0, timeout_s=0.01) is None
    got: list[Queued] = []

    def poll() -> None:
        result = box.get(0, timeout_s=5.0)
        assert result is not None
        got.append(result)

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.05)
    start = RoundStart(b"cfg")
    assert box.push(start, b"payload") == 0
    waiter.join(5)
    assert got == [Queued(0, start, b"payload")]
    box.push(SecAggMessage(b"s" * 32), b"message")
    end = RoundEnd(0, reason="TooFewSurvivors")
    box.push(end)
    assert box.get(2, 0.01) == Queued(2, end, b"")
    # Asking for 2 acknowledged 0 and 1: a stale request gets the oldest item still held.
    assert box.get(0, 0.01) == Queued(2, end, b"")
    assert box.restart() == 3
    assert box.get(0, 0.01) is None  # nothing queued before the restart is served


def test_one_item_queued_for_many_clients_takes_each_outboxs_number() -> None:
    """The round loop queues one RoundStart for the whole cohort: each outbox numbers it in its
    own sequence, and every client gets the same bytes."""
    boxes = Mailboxes()
    boxes.of(1).push(RoundEnd(0, completed=True))
    start = RoundStart(b"the round's config, serialized once")
    assert [boxes.of(c).push(start, b"model") for c in (1, 2)] == [1, 0]
    assert boxes.of(1).get(1, 0.0) == Queued(1, start, b"model")
    assert boxes.of(2).get(0, 0.0) == Queued(0, start, b"model")
    with pytest.raises(dataclasses.FrozenInstanceError):
        start.config = b"another"  # type: ignore[misc]


def test_online_means_polling_recently() -> None:
    boxes = Mailboxes()
    boxes.of(3).get(0, 0.0)
    boxes.of(5)
    assert boxes.online(within_s=60.0) == [3]


def test_upload_limits_follow_the_round_parameters() -> None:
    assert upload_limit(pb.MASKED_INPUT, 32, 1000, 5) == packed_size(32, 1000) + 256
    assert upload_limit(pb.SHARE_KEYS, 32, 10**6, 5) < 4096  # small messages stay small
    with pytest.raises(WireFormatError):
        upload_limit(pb.MESSAGE_KIND_UNSPECIFIED, 32, 1000, 5)


def test_an_outsider_asking_for_challenges_cannot_keep_a_client_out(
    setup: tuple[Admission, Identity],
) -> None:
    """Anyone who reaches the port may request challenges for any id; before, each request
    replaced the institution's pending nonce, so a loop of them locked it out."""
    admission, identity = setup
    nonce = admission.challenge(1)
    for _ in range(50):
        admission.challenge(1)  # the outsider, between the client's two calls
    token = admission.authenticate(1, nonce, CERT, _sign(identity, nonce))
    assert admission.client_of(token) == 1
    # Outstanding nonces stay single use and bound to their id.
    replay = _refusal(lambda: admission.authenticate(1, nonce, CERT, _sign(identity, nonce)))
    assert "already used" in str(replay)
    forged = bytes(32)
    assert "not issued" in str(
        _refusal(lambda: admission.authenticate(1, forged, CERT, _sign(identity, forged)))
    )


def test_a_second_process_of_one_institution_is_refused_while_the_first_is_live(
    setup: tuple[Admission, Identity],
) -> None:
    admission, identity = setup

    def admit(instance: bytes, polling: bool = False) -> bytes:
        nonce = admission.challenge(1)
        return admission.authenticate(
            1, nonce, CERT, _sign(identity, nonce), instance, polling=polling
        )

    first = admit(b"A")
    admission.client_of(first)  # the first process polls
    duplicate = _refusal(lambda: admit(b"B"))
    assert duplicate.code is grpc.StatusCode.ALREADY_EXISTS and "running twice" in str(duplicate)
    assert admission.client_of(first) == 1  # the first one keeps its login
    again = admit(b"A")  # the same process re-admitting (it lost its token) is let in
    assert admission.client_of(again) == 1
    with pytest.raises(Refusal):
        admission.client_of(first)


def test_a_restarted_process_is_admitted_once_the_old_one_is_silent(
    setup: tuple[Admission, Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.admission as module

    admission, identity = setup
    nonce = admission.challenge(1)
    admission.authenticate(1, nonce, CERT, _sign(identity, nonce), b"old")
    monkeypatch.setattr(module, "ACTIVE_WITHIN_S", 0.0)
    time.sleep(0.01)
    nonce = admission.challenge(1)
    with pytest.raises(Refusal):  # ... unless a poll of the old one is still in flight
        admission.authenticate(1, nonce, CERT, _sign(identity, nonce), b"new", polling=True)
    nonce = admission.challenge(1)
    token = admission.authenticate(1, nonce, CERT, _sign(identity, nonce), b"new")
    assert admission.client_of(token) == 1

"""A client session carried across messages as bytes (``export_state`` / ``from_state``).

A Flower ``ClientApp`` may handle each message of a node in a different worker process, so the
fedsec mod keeps the session in the node's ``Context`` between messages. The restored session
must behave exactly like the live one, including every refusal, and bad bytes must not load.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from secagg.errors import MessageFormatError, PolicyViolation, ProtocolAbort, ShareRequestRefused
from secagg.keys import Identity, Roster
from secagg.messages import ServerMessage, UnmaskRequest, decode_message, encode_message
from secagg.protocol import ClientPolicy, ClientSession, RoundParams, ServerSession, Stage
from secagg.ring import Ring

POLICY = ClientPolicy(min_cohort=3, corrupt_fraction=0.0, dropout_fraction=0.0)


def _setup(n: int, neighbours: int | None) -> tuple[RoundParams, dict[int, Identity], Roster]:
    cohort = tuple(range(1, n + 1))
    k = neighbours if neighbours is not None else n - 1
    params = RoundParams(os.urandom(32), 32, 50, threshold=k // 2 + 1 if k < n - 1 else n // 2 + 1,
                         cohort=cohort, neighbours=neighbours)  # fmt: skip
    identities = {u: Identity.generate() for u in cohort}
    return params, identities, Roster({u: i.public_bytes for u, i in identities.items()})


@pytest.mark.parametrize(("n", "neighbours", "dropped"), [(5, None, 0), (9, 4, 1), (9, 4, 0)])
def test_session_restored_before_every_message_gives_the_exact_sum(
    n: int, neighbours: int | None, dropped: int
) -> None:
    params, identities, roster = _setup(n, neighbours)
    ring = Ring(32)
    rng = np.random.default_rng(1)
    inputs = {u: ring.from_signed(rng.integers(-1000, 1000, params.dim)) for u in params.cohort}
    states: dict[int, bytes] = {}
    server = ServerSession(params, roster)
    for u in params.cohort:
        session = ClientSession(u, identities[u], roster, params, inputs[u], b"ctx", POLICY)
        server.receive(encode_message(session.start()))
        states[u] = session.export_state()
    gone = set(params.cohort[:dropped])
    while outgoing := server.close_stage():
        if server.stage is Stage.MASKED_INPUT:
            outgoing = [m for m in outgoing if m.recipient not in gone]
        for message in outgoing:
            u = message.recipient
            session = ClientSession.from_state(states[u], identities[u], roster, POLICY)
            incoming = decode_message(encode_message(message))
            assert isinstance(incoming, ServerMessage)
            server.receive(encode_message(session.handle(incoming)))
            states[u] = session.export_state()
    survivors = [u for u in params.cohort if u not in gone]
    expected = ring.zeros(50)
    for u in survivors:
        expected += inputs[u]  # uint32 wraps: the ring's own arithmetic
    assert server.result.contributors == tuple(survivors)
    np.testing.assert_array_equal(server.result.sum, expected)


def test_restored_session_still_refuses_both_shares_of_one_client() -> None:
    """The never-both rule survives a restore: a client listed as alive and dropped."""
    params, identities, roster = _setup(5, None)
    sessions = {
        u: ClientSession(u, identities[u], roster, params, params.ring.zeros(50), b"", POLICY)
        for u in params.cohort
    }
    server = ServerSession(params, roster)
    for s in sessions.values():
        server.receive(s.start())
    outgoing = server.close_stage()
    while not isinstance(outgoing[0], UnmaskRequest):
        for message in outgoing:
            u = message.recipient
            s = ClientSession.from_state(sessions[u].export_state(), identities[u], roster, POLICY)
            sessions[u] = s
            server.receive(s.handle(message))
        outgoing = server.close_stage()
    request = outgoing[0]
    assert isinstance(request, UnmaskRequest)
    evil = UnmaskRequest(
        request.session_id,
        request.recipient,
        request.survivors,
        request.signatures,
        request.reveal_self_mask_for,
        (request.reveal_self_mask_for[-1],),
    )
    u = request.recipient
    restored = ClientSession.from_state(sessions[u].export_state(), identities[u], roster, POLICY)
    with pytest.raises(ShareRequestRefused):
        restored.handle(evil)
    # The abort erased every secret, in the state too.
    after = ClientSession.from_state(restored.export_state(), identities[u], roster, POLICY)
    assert after.aborted
    with pytest.raises(ProtocolAbort):
        after.handle(request)


def test_state_bytes_are_checked() -> None:
    params, identities, roster = _setup(4, None)
    session = ClientSession(1, identities[1], roster, params, params.ring.zeros(50), b"", POLICY)
    session.start()
    state = session.export_state()
    for bad in (state[:-1], state + b"\x00", b"XYZ" + state[3:], state[:40]):
        with pytest.raises(MessageFormatError):
            ClientSession.from_state(bad, identities[1], roster, POLICY)
    strict = ClientPolicy(min_threshold=4)
    with pytest.raises(PolicyViolation):
        ClientSession.from_state(state, identities[1], roster, strict)

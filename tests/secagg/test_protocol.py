"""Behaviour of the Bonawitz / SecAgg+ protocol that users and auditors rely on."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from secagg.errors import (
    ConfigurationError,
    ConsistencyError,
    DecryptionError,
    DuplicateClient,
    InconsistentSharesError,
    InvalidSignatureError,
    MessageFormatError,
    PolicyViolation,
    ProtocolAbort,
    SessionMismatch,
    ShareRequestRefused,
    SumBackendFailure,
    TooFewSurvivors,
    UnknownClient,
)
from secagg.keys import Identity
from secagg.messages import (
    AdvertiseKeys,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    ServerMessage,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    encode_message,
)
from secagg.packing import pack, unpack
from secagg.params import active_server_floor, secaggplus_params
from secagg.protocol import (
    ClientPolicy,
    ClientSession,
    InProcessSum,
    RoundParams,
    Stage,
    context_digest,
)
from secagg.ring import Ring, RingArray
from secagg.simulate import Simulation, make_identities, simulate_round

# No assumed collusion: the smallest thresholds and degrees any client accepts.
PERMISSIVE = ClientPolicy(min_threshold=2, min_cohort=2, min_ring_bits=1, corrupt_fraction=0.0)


def _inputs(params: RoundParams, seed: int = 0) -> dict[int, RingArray]:
    ring = params.ring
    rng = np.random.default_rng(seed)
    return {
        u: ring.reduce(rng.integers(0, 2**63, params.dim, dtype=np.uint64).astype(ring.dtype))
        for u in params.cohort
    }


def _exact_sum(inputs: dict[int, RingArray], ids: tuple[int, ...], ring: Ring) -> RingArray:
    total = ring.zeros(len(next(iter(inputs.values()))))
    for u in ids:
        np.add(total, inputs[u], out=total)
    return ring.reduce(total)


def _params(
    n: int = 6, t: int = 3, dim: int = 64, bits: int = 32, k: int | None = None
) -> RoundParams:
    return RoundParams(os.urandom(32), bits, dim, t, tuple(range(1, n + 1)), k)


# --- correctness ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sum_is_exact_with_dropouts_at_every_stage(data: st.DataObject) -> None:
    n = data.draw(st.integers(3, 40), label="n")
    k = data.draw(st.one_of(st.none(), st.integers(2, n - 1)), label="k")
    bits = data.draw(st.integers(1, 64))
    params0 = _params(n, 2, data.draw(st.integers(1, 40)), bits, k)
    floor = active_server_floor(n, params0.degree, 0.0, 0.05)
    if params0.degree < floor.min_degree or floor.min_threshold > params0.degree + 1:
        params0 = dataclasses.replace(params0, neighbours=None)
        floor = active_server_floor(n, n - 1, 0.0, 0.05)
    t = data.draw(st.integers(floor.min_threshold, params0.degree + 1), label="t")
    params = dataclasses.replace(params0, threshold=t)
    inputs = _inputs(params, data.draw(st.integers(0, 2**16)))
    # Dropouts the protocol must tolerate with a complete graph: down to the release floor
    # (t and the survivor-set quorum); before any masked input SecAgg+ needs every reveal.
    budget = n - params.min_release
    dropouts: dict[Stage, set[int]] = {}
    alive = list(params.cohort)
    for stage in params.stages:
        if stage is Stage.ADVERTISE_KEYS and not params.is_complete:
            dropouts[stage] = set()
            continue
        count = data.draw(st.integers(0, budget), label=f"drop@{stage.value}")
        gone = set(data.draw(st.permutations(alive))[:count]) if count else set()
        dropouts[stage] = gone
        alive = [u for u in alive if u not in gone]
        budget -= count
    try:
        outcome = simulate_round(params, inputs, dropouts=dropouts, policy=PERMISSIVE)
    except TooFewSurvivors:
        # Only possible for sparse graphs, where a neighbourhood can fall below t.
        assert not params.is_complete
        return
    contributors = outcome.result.contributors
    before_input = [s for s in params.stages if s not in (Stage.CONSISTENCY_CHECK, Stage.UNMASK)]
    dropped_before_input = set().union(*(dropouts[s] for s in before_input))
    expected = set(params.cohort) - dropped_before_input
    if params.is_complete:
        assert set(contributors) == expected
    else:  # a client whose neighbourhood fell below t refuses to go on, and says so
        assert set(contributors) <= expected
        assert expected - set(contributors) <= set(outcome.client_aborts)
    np.testing.assert_array_equal(outcome.result.sum, _exact_sum(inputs, contributors, params.ring))


def test_secaggplus_neighbourhoods_with_dropouts() -> None:
    plus = secaggplus_params(40, 0.05, 0.05, semi_malicious_server=True)
    params = _params(n=40, t=plus.t, dim=500, bits=24, k=plus.k)
    inputs = _inputs(params, 3)
    outcome = simulate_round(
        params, inputs, dropouts={Stage.MASKED_INPUT: {3, 17}, Stage.UNMASK: {9}}
    )
    assert 3 not in outcome.result.contributors and 9 in outcome.result.contributors
    np.testing.assert_array_equal(
        outcome.result.sum, _exact_sum(inputs, outcome.result.contributors, params.ring)
    )
    # SecAgg+: each client's key and share messages scale with k, not n.
    share_sizes = [m.size for m in outcome.transcript.messages if m.kind == "ShareKeys"]
    assert max(share_sizes) < (plus.k + 1) * 200


def test_fewer_than_t_survivors_aborts_and_releases_nothing() -> None:
    params = _params(n=5, t=4)
    sim = Simulation(params, _inputs(params), dropouts={Stage.MASKED_INPUT: {1, 2}})
    with pytest.raises(TooFewSurvivors):
        sim.run()
    assert sim.server.stage is Stage.ABORTED
    assert not sim.server.transcript.releases
    assert not sim.server.transcript.share_requests  # no share was ever requested
    with pytest.raises(ProtocolAbort):
        _ = sim.server.result


def test_too_few_unmask_answers_aborts() -> None:
    params = _params(n=5, t=4)
    sim = Simulation(params, _inputs(params), dropouts={Stage.UNMASK: {1, 2}})
    with pytest.raises(TooFewSurvivors):
        sim.run()
    assert not sim.server.transcript.releases


class _FailingBackend(InProcessSum):
    """A sum backend whose worker 'dies' at a chosen step (as a process-pool backend's may)."""

    def __init__(self, fail_add_after: int | None = None, fail_unmask: bool = False) -> None:
        self.adds = 0
        self.fail_add_after = fail_add_after
        self.fail_unmask = fail_unmask

    def add_packed(self, total: RingArray, payload: bytes, ring: Ring) -> None:
        if self.adds == self.fail_add_after:
            raise SumBackendFailure("worker 2 died")
        self.adds += 1
        super().add_packed(total, payload, ring)

    def remove_masks(
        self,
        total: RingArray,
        ring: Ring,
        add_keys: Sequence[bytes],
        subtract_keys: Sequence[bytes],
    ) -> None:
        if self.fail_unmask:
            raise SumBackendFailure("worker 1 died")
        super().remove_masks(total, ring, add_keys, subtract_keys)


@pytest.mark.parametrize("bits", [20, 32, 64])
def test_an_injected_backend_computes_the_sum(bits: int) -> None:
    params = _params(n=7, t=4, dim=301, bits=bits)
    inputs = _inputs(params, 5)
    backend = _FailingBackend()
    sim = Simulation(params, inputs, dropouts={Stage.MASKED_INPUT: {2}}, server_backend=backend)
    outcome = sim.run()
    assert backend.adds == 6
    np.testing.assert_array_equal(
        outcome.result.sum, _exact_sum(inputs, outcome.result.contributors, params.ring)
    )


@pytest.mark.parametrize("where", ["add", "unmask"])
def test_a_failing_sum_backend_aborts_the_session_and_releases_nothing(where: str) -> None:
    params = _params(n=5, t=3)
    backend = (
        _FailingBackend(fail_add_after=2) if where == "add" else _FailingBackend(fail_unmask=True)
    )
    sim = Simulation(params, _inputs(params), server_backend=backend)
    with pytest.raises(ProtocolAbort, match="died"):
        sim.run()
    assert sim.server.stage is Stage.ABORTED
    assert sim.server.abort_reason is not None and "died" in sim.server.abort_reason
    assert not sim.server.transcript.releases
    with pytest.raises(ProtocolAbort):
        _ = sim.server.result


# --- the DP survivor floor --------------------------------------------------------------------


def _floored(n: int = 6, t: int = 4, floor: int = 5) -> RoundParams:
    return dataclasses.replace(_params(n=n, t=t), min_survivors=floor)


def test_survivor_floor_above_t_aborts_at_the_server_when_too_many_drop() -> None:
    params = _floored()
    # 4 of 6 masked inputs would meet t = 4, but the noise is sized for at least 5.
    sim = Simulation(params, _inputs(params), dropouts={Stage.MASKED_INPUT: {1, 2}})
    with pytest.raises(TooFewSurvivors, match="release floor is 5"):
        sim.run()
    assert sim.server.stage is Stage.ABORTED
    assert not sim.server.transcript.releases
    assert not sim.server.transcript.share_requests


def test_survivor_floor_is_met_and_recorded_as_the_release_threshold() -> None:
    params = _floored()
    inputs = _inputs(params)
    outcome = simulate_round(params, inputs, dropouts={Stage.MASKED_INPUT: {6}})
    assert outcome.result.contributors == (1, 2, 3, 4, 5)
    assert np.array_equal(outcome.result.sum, _exact_sum(inputs, (1, 2, 3, 4, 5), params.ring))
    (release,) = outcome.transcript.releases
    assert release.threshold == 5 and outcome.transcript.min_release == 5


def test_client_refuses_a_survivor_set_below_the_floor_even_if_the_server_sends_one() -> None:
    params = _floored()
    sim, inbox = _drive_to(Stage.CONSISTENCY_CHECK, params)
    msg = decode_message(inbox[1])
    assert isinstance(msg, ConsistencyRequest)
    # A server that lets 4 >= t contributors through: client 1 must not sign (or unmask).
    with pytest.raises(TooFewSurvivors, match="DP floor 5"):
        sim.clients[1].handle(dataclasses.replace(msg, survivors=(1, 2, 3, 4)))
    assert sim.clients[1].aborted


@pytest.mark.parametrize("floor", [2, 7, -1])
def test_survivor_floor_outside_threshold_and_cohort_is_refused(floor: int) -> None:
    with pytest.raises(ConfigurationError, match="min_survivors"):
        _floored(n=6, t=4, floor=floor)


def test_the_floor_is_bound_into_what_clients_sign() -> None:
    plain = _params(n=6, t=4)
    floored = dataclasses.replace(plain, min_survivors=5)
    assert plain.min_release == 4 and floored.min_release == 5
    # A server cannot hand some clients a lower floor: their signed digests would differ.
    assert context_digest(plain, b"model") != context_digest(floored, b"model")
    assert context_digest(floored, b"model") != context_digest(
        dataclasses.replace(floored, min_survivors=6), b"model"
    )


# --- what the server sees -------------------------------------------------------------------


def test_masked_vector_is_uniform_and_transcript_holds_no_plain_input() -> None:
    params = _params(n=4, t=3, dim=1 << 16, bits=16)
    ring = params.ring
    inputs = {
        u: ring.zeros(params.dim) + np.uint32(7 * u) for u in params.cohort
    }  # very non-uniform
    outcome = simulate_round(params, inputs)
    for u, payload in outcome.transcript.masked_inputs.items():
        masked = unpack(payload, ring, params.dim)
        assert stats.chisquare(np.bincount(masked >> 8, minlength=256)).pvalue > 1e-4
        assert payload != pack(inputs[u], ring)
    plain = {pack(v, ring) for v in inputs.values()}
    assert not plain & set(outcome.transcript.masked_inputs.values())


# --- malicious server -----------------------------------------------------------------------


def _rewrite_unmask(**changes: tuple[int, ...]):  # type: ignore[no-untyped-def]
    def hook(msg: ServerMessage) -> ServerMessage:
        if isinstance(msg, UnmaskRequest) and msg.recipient == 1:
            return dataclasses.replace(msg, **changes)
        return msg

    return hook


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        # the same neighbour as surviving and dropped: both of its shares
        ({"reveal_self_mask_for": (2, 3), "reveal_key_for": (2,)}, "both"),
        # a survivor named as dropped: its key share plus its (already public) masked input
        ({"reveal_self_mask_for": (1, 3, 4), "reveal_key_for": (2, 5)}, "signed survivor set"),
        # a client outside the consistency-checked survivor set
        ({"reveal_self_mask_for": (1, 2, 5), "reveal_key_for": ()}, "outside"),
    ],
)
def test_client_refuses_dangerous_share_requests(
    changes: dict[str, tuple[int, ...]], reason: str
) -> None:
    params = _params(n=5, t=3)
    sim = Simulation(
        params,
        _inputs(params),
        dropouts={Stage.MASKED_INPUT: {5}},
        server_hook=_rewrite_unmask(**changes),
    )
    sim.run()  # the others still finish the round
    assert sim.client_aborts[1].startswith("ShareRequestRefused")
    assert reason in sim.client_aborts[1]
    assert sim.clients[1].aborted
    # client 1 released no share at all
    assert all(m.sender != 1 for m in sim.server.transcript.messages if m.kind == "UnmaskResponse")


def test_client_answers_one_unmask_request_only() -> None:
    params = _params(n=4, t=3)
    requests: list[UnmaskRequest] = []

    def keep(msg: ServerMessage) -> ServerMessage:
        if isinstance(msg, UnmaskRequest) and msg.recipient == 1:
            requests.append(msg)
        return msg

    sim = Simulation(params, _inputs(params), server_hook=keep)
    sim.run()
    with pytest.raises(ProtocolAbort):
        sim.clients[1].handle(dataclasses.replace(requests[0], reveal_self_mask_for=(1,)))


def test_survivor_set_with_too_few_signatures_is_refused() -> None:
    params = _params(n=5, t=4)
    hook = _rewrite_unmask()

    def strip(msg: ServerMessage) -> ServerMessage:
        msg = hook(msg)
        if isinstance(msg, UnmaskRequest) and msg.recipient == 1:
            return dataclasses.replace(msg, signatures=msg.signatures[:2])
        return msg

    sim = Simulation(params, _inputs(params), server_hook=strip)
    sim.run()
    assert sim.client_aborts[1].startswith("ConsistencyError")


def test_different_models_for_different_clients_abort_the_round() -> None:
    params = _params(n=5, t=3)
    contexts = {1: b"model-A", 2: b"model-A", 3: b"model-B", 4: b"model-A", 5: b"model-A"}
    sim = Simulation(params, _inputs(params), contexts=contexts)
    with pytest.raises(TooFewSurvivors):
        sim.run()
    assert all(r.startswith("ConsistencyError") for r in sim.client_aborts.values())
    assert not sim.server.transcript.masked_inputs  # nobody masked anything


def test_server_changing_the_survivor_set_after_signing_is_caught() -> None:
    params = _params(n=5, t=3)
    sim = Simulation(
        params,
        _inputs(params),
        server_hook=_rewrite_unmask(survivors=(1, 2, 3, 4)),
    )
    sim.run()
    assert sim.client_aborts[1].startswith("ConsistencyError")


# --- forged, tampered, replayed, duplicated --------------------------------------------------


def _drive_to(stage: Stage, params: RoundParams) -> tuple[Simulation, dict[int, bytes]]:
    """Run honest clients through the stages before ``stage``; return its server messages."""
    sim = Simulation(params, _inputs(params))
    server = sim.server
    inbox: dict[int, ServerMessage] = {}
    for current in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT):
        if current is stage:
            break
        for u, client in sim.clients.items():
            reply = client.start() if current is Stage.ADVERTISE_KEYS else client.handle(inbox[u])
            server.receive(reply)
        inbox = {m.recipient: m for m in server.close_stage()}
    return sim, {u: encode_message(m) for u, m in inbox.items()}


def test_forged_advert_signature_rejected_and_round_goes_on() -> None:
    params = _params(n=4, t=3)
    sim = Simulation(params, _inputs(params))
    honest = sim.clients[2].start()
    forged = dataclasses.replace(honest, signature=Identity.generate().sign(b"x"))
    with pytest.raises(InvalidSignatureError):
        sim.server.receive(forged)
    sim.server.receive(honest)  # the honest message is still accepted
    assert sim.server.transcript.rejections[0].error == "InvalidSignatureError"


def test_client_rejects_forged_neighbour_advert() -> None:
    params = _params(n=4, t=3)
    sim, inbox = _drive_to(Stage.SHARE_KEYS, params)
    msg = decode_message(inbox[1])
    assert isinstance(msg, KeysBroadcast)
    bad = dataclasses.replace(msg.adverts[0], masking_public=os.urandom(32))
    with pytest.raises(InvalidSignatureError):
        sim.clients[1].handle(dataclasses.replace(msg, adverts=(bad, *msg.adverts[1:])))
    assert sim.clients[1].aborted
    with pytest.raises(ProtocolAbort):  # fail closed: nothing more from this session
        sim.clients[1].handle(msg)


def test_tampered_share_ciphertext_rejected() -> None:
    params = _params(n=4, t=3)
    sim, inbox = _drive_to(Stage.MASKED_INPUT, params)
    msg = decode_message(inbox[1])
    assert isinstance(msg, SharesDelivery)
    v, ct = msg.ciphertexts[0]
    flipped = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(DecryptionError):
        sim.clients[1].handle(
            dataclasses.replace(msg, ciphertexts=((v, flipped), *msg.ciphertexts[1:]))
        )


def test_message_from_another_session_rejected_by_both_ends() -> None:
    params = _params(n=4, t=3)
    sim, inbox = _drive_to(Stage.SHARE_KEYS, params)
    old_broadcast = decode_message(inbox[1])
    assert isinstance(old_broadcast, KeysBroadcast)
    new_params = dataclasses.replace(params, session_id=os.urandom(32))
    fresh = Simulation(new_params, _inputs(new_params))
    old_client = ClientSession(2, sim.identities[2], sim.roster, params, _inputs(params)[2])
    with pytest.raises(SessionMismatch):  # a client message replayed to the new session
        fresh.server.receive(old_client.start())
    fresh.clients[1].start()
    with pytest.raises(SessionMismatch):  # a server message replayed to a client
        fresh.clients[1].handle(old_broadcast)
    assert fresh.clients[1].aborted


def test_duplicate_client_messages_and_ids_rejected() -> None:
    params = _params(n=4, t=3)
    sim = Simulation(params, _inputs(params))
    advert = sim.clients[1].start()
    sim.server.receive(advert)
    with pytest.raises(DuplicateClient):
        sim.server.receive(advert)
    with pytest.raises(DuplicateClient):
        RoundParams(os.urandom(32), 32, 4, 2, (1, 2, 2, 3))
    stranger = dataclasses.replace(advert, sender=99)
    with pytest.raises(UnknownClient):
        sim.server.receive(stranger)


def test_corrupted_share_detected_at_unmask() -> None:
    params = _params(n=5, t=3)
    sim = Simulation(params, _inputs(params))
    receive = sim.server.receive

    def corrupting_receive(data: bytes | ClientMessage) -> None:
        msg = decode_message(data) if isinstance(data, bytes) else data
        if isinstance(msg, UnmaskResponse) and msg.sender == 2:
            v, share = msg.self_mask_shares[0]
            bad = share[:-1] + bytes([share[-1] ^ 1])
            msg = dataclasses.replace(msg, self_mask_shares=((v, bad), *msg.self_mask_shares[1:]))
        receive(msg)  # type: ignore[arg-type]

    sim.server.receive = corrupting_receive  # type: ignore[method-assign]
    with pytest.raises(InconsistentSharesError):
        sim.run()
    assert not sim.server.transcript.releases


def test_malformed_masked_input_rejected_with_named_error() -> None:
    params = _params(n=4, t=3, dim=10)
    sim, _ = _drive_to(Stage.MASKED_INPUT, params)
    with pytest.raises(MessageFormatError):
        sim.server.receive(MaskedInput(params.session_id, 1, b"\x00" * 7))


def test_consistency_signature_forgery_rejected() -> None:
    params = _params(n=4, t=3)
    sim, inbox = _drive_to(Stage.CONSISTENCY_CHECK, params)
    with pytest.raises(InvalidSignatureError):
        sim.server.receive(ConsistencySignature(params.session_id, 1, bytes(64)))
    for u, client in sim.clients.items():
        request = decode_message(inbox[u])
        assert isinstance(request, ConsistencyRequest)
        sim.server.receive(client.handle(request))  # the honest signatures are still accepted
    assert len(sim.server.close_stage()) == 4


# --- policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params_kw", "policy", "needle"),
    [
        ({"t": 2}, ClientPolicy(min_threshold=3), "threshold 2 < policy minimum 3"),
        ({"n": 4}, ClientPolicy(min_cohort=10), "cohort of 4 < policy minimum 10"),
        ({"bits": 12}, ClientPolicy(min_ring_bits=16), "ring of 12 bits"),
        ({"n": 10, "t": 5}, ClientPolicy(), "threshold 5 < 6"),
        ({"n": 10, "t": 6}, ClientPolicy(corrupt_fraction=0.2), "threshold 6 < 7"),
    ],
)
def test_client_refuses_parameters_below_policy(
    params_kw: dict[str, int], policy: ClientPolicy, needle: str
) -> None:
    params = _params(**params_kw)
    identities, roster = make_identities(params.cohort)
    with pytest.raises(PolicyViolation, match=needle):
        ClientSession(
            1, identities[1], roster, params, params.ring.zeros(params.dim), policy=policy
        )


def test_advert_is_bound_to_the_context() -> None:
    params = _params(n=3, t=2)
    identities, roster = make_identities(params.cohort)
    a = ClientSession(
        1, identities[1], roster, params, params.ring.zeros(params.dim), b"m1"
    ).start()
    b = ClientSession(
        1, identities[1], roster, params, params.ring.zeros(params.dim), b"m2"
    ).start()
    assert isinstance(a, AdvertiseKeys) and a.context_digest != b.context_digest


def test_consistency_error_type_is_exported() -> None:
    assert issubclass(ConsistencyError, ProtocolAbort)
    assert issubclass(ShareRequestRefused, ProtocolAbort)

"""Attacks of an active server on the protocol, through the public API (issue: "Make every
guarantee of proofs/SPEC.md hold against an active server").

Each test plays the server with :class:`tests.secagg.adversary.ActiveServer`, lets honest
clients answer, and then tries to recover the target's input from what they released. Before
the defences each attack recovered the input bit-exactly with no corrupt client at all.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secagg.errors import (
    ConfigurationError,
    GraphSeedError,
    InvalidPublicKey,
    PolicyViolation,
    ProtocolAbort,
    UnexpectedMessage,
)
from secagg.keys import AgreementKeyPair
from secagg.messages import (
    AdvertiseKeys,
    KeysBroadcast,
    MaskedInput,
    PeerAdvert,
    SeedCommitments,
)
from secagg.params import active_server_floor, secaggplus_params
from secagg.protocol import ClientPolicy, ClientSession, RoundParams, Stage, context_digest
from secagg.protocol.common import advert_signed_bytes
from secagg.simulate import Simulation, make_identities, simulate_round
from tests.secagg.adversary import ActiveServer, random_inputs


def _params(n: int, t: int, k: int | None = None, floor: int = 0, dim: int = 32) -> RoundParams:
    return RoundParams(os.urandom(32), 32, dim, t, tuple(range(1, n + 1)), k, min_survivors=floor)


# --- 1. isolation -------------------------------------------------------------------------------


def test_isolating_a_client_by_withholding_shares_recovers_nothing() -> None:
    """n = 7, t = 4, complete graph, no corrupt client: client 1 receives only the shares of
    2, 3, 4 (so it masks with those only); U3 = (1, 5, 6, 7) calls 2, 3, 4 dropped."""
    params = _params(7, 4)
    inputs = random_inputs(params)
    server = ActiveServer(params, inputs)
    server.advertise()
    server.share_keys()
    server.masked_inputs(lambda u: (2, 3, 4) if u == 1 else [v for v in range(1, 8) if v != u])
    u3 = (1, 5, 6, 7)
    server.collect_signatures(dict.fromkeys(u3, u3))
    assert server.refusals[1].startswith("SurvivorSetRefused")
    assert "never" in server.refusals[1]
    server.request_what_each_holds(u3, (2, 3, 4), u3)
    assert server.recover(1) is None
    # 5, 6, 7 signed, but three signatures are below the quorum of 4: nobody released anything.
    assert not server.responses


def test_secaggplus_neighbourhood_declared_dropped_recovers_nothing() -> None:
    """SecAgg+ at the smallest parameters every client accepts: the server calls the target's
    whole neighbourhood dropped while those neighbours, alive, are still asked to sign."""
    n = 50
    plus = secaggplus_params(n, 0.05, 0.05, semi_malicious_server=True)
    params = _params(n, plus.t, plus.k)
    server = ActiveServer(params, random_inputs(params))
    server.advertise()
    server.share_keys()
    server.masked_inputs()
    target = 1
    hood = set(server.neighbours(target))
    u3 = tuple(u for u in params.cohort if u not in hood)
    # Everyone, the neighbourhood included, is shown U3 and asked to sign it.
    server.collect_signatures({u: u3 for u in params.cohort})
    for v in hood:
        assert server.refusals[v].startswith("SurvivorSetRefused")  # "omits us"
    assert server.refusals[target].startswith("SurvivorSetRefused")  # too few neighbours
    server.request_what_each_holds(u3, hood, params.cohort)
    assert server.recover(target) is None


def test_finders_old_semi_honest_parameters_are_refused_by_every_client() -> None:
    """The issue's SecAgg+ instance (n = 50, the semi-honest finder's k = 6, t = 3)."""
    honest = secaggplus_params(50, 0.05, 0.05)
    assert (honest.k, honest.t) == (6, 3)
    with pytest.raises(PolicyViolation, match="degree 6"):
        ActiveServer(_params(50, honest.t, honest.k), random_inputs(_params(50, 3, 6)))


def test_padding_the_survivor_set_cannot_release_a_sum_below_the_floor() -> None:
    """n = 6, t = 4, floor 5: U3 = (1, 2, 3, 4, 6) where 6's shares were withheld from 1..4
    (they never masked with 6) and 5 is called dropped: the sum of 1..4 would come out."""
    params = _params(6, 4, floor=5)
    server = ActiveServer(params, random_inputs(params))
    server.advertise()
    server.share_keys()
    server.masked_inputs(
        lambda u: (
            [v for v in range(1, 7) if v not in (u, 6)]
            if u < 5
            else [v for v in range(1, 7) if v != u]
        )
    )
    u3 = (1, 2, 3, 4, 6)
    server.collect_signatures(dict.fromkeys(u3, u3))
    for u in (1, 2, 3, 4):
        assert server.refusals[u].startswith("SurvivorSetRefused")
    server.request_what_each_holds(u3, (5,), u3)
    assert not server.responses  # 6 alone signed: below the quorum
    assert all(server.recover(u) is None for u in params.cohort)


# --- 2. split survivor views --------------------------------------------------------------------


def _split_views(
    params: RoundParams,
    target: int,
    group_a: tuple[int, ...],
    group_b: tuple[int, ...],
    policy: ClientPolicy | None = None,
) -> ActiveServer:
    """Group A sees a U3 with the target (releases its self-mask seed share), group B a U3
    without it (releases its masking-key share)."""
    server = ActiveServer(params, random_inputs(params), policy=policy)
    server.advertise()
    server.share_keys()
    server.masked_inputs()
    with_target = tuple(sorted({target, *group_a}))
    without = tuple(sorted(group_b))
    server.collect_signatures(
        {**dict.fromkeys(with_target, with_target), **dict.fromkeys(without, without)}
    )
    for u in with_target:
        server.request_unmask(u, with_target, self_for=(target,), key_for=())
    for u in without:
        server.request_unmask(u, without, self_for=(), key_for=(target,))
    return server


def test_a_threshold_an_active_server_can_split_is_refused() -> None:
    """n = 7, t = 3 (accepted by ClientPolicy() before): the two groups {7, 1, 2} and
    {3, 4, 5} hold 3 shares each."""
    with pytest.raises(PolicyViolation, match="threshold 3 < 4"):
        _split_views(_params(7, 3), 7, (1, 2), (3, 4, 5))
    # n = 8, t = 4 (admitted by the old 50%-of-degree option) is refused too.
    with pytest.raises(PolicyViolation, match="threshold 4 < 5"):
        _split_views(_params(8, 4), 8, (1, 2, 3), (4, 5, 6, 7))


def test_split_views_at_the_smallest_accepted_threshold_recover_nothing() -> None:
    params = _params(7, 4)
    server = _split_views(params, 7, (1, 2, 3), (4, 5, 6))
    assert server.recover(7) is None
    # The view with the target has its 4 signers and releases b_7; the other view cannot
    # reach the quorum of 4 without one of them, so nobody releases 7's masking key.
    assert set(server.responses) == {1, 2, 3, 7}
    assert all(not r.key_shares for r in server.responses.values())


def test_the_threshold_and_degree_floors_follow_the_clients_own_corrupt_fraction() -> None:
    params = _params(20, 11)
    identities, roster = make_identities(params.cohort)
    zero = params.ring.zeros(params.dim)
    ClientSession(1, identities[1], roster, params, zero)  # 5 %: c = 1, t >= 11
    with pytest.raises(PolicyViolation, match="threshold 11 < 14"):
        ClientSession(
            1, identities[1], roster, params, zero, policy=ClientPolicy(corrupt_fraction=0.3)
        )  # c = 6: t >= 14
    # k cut from the required degree to 5 at n = 100 is refused whatever t is.
    cut = _params(100, 6, k=5)
    ids, roster100 = make_identities(cut.cohort)
    with pytest.raises(PolicyViolation, match="degree"):
        ClientSession(1, ids[1], roster100, cut, cut.ring.zeros(cut.dim))
    floor = active_server_floor(100, 99, 0.05, 0.05)
    assert floor.min_threshold == floor.quorum == (100 + 5) // 2 + 1


def test_the_semi_malicious_threshold_counts_the_share_a_client_keeps_of_itself() -> None:
    # 2t > k + a + 1: at k = 4 with one corrupt neighbour t must be 4, not the reference's 3.
    plus = secaggplus_params(20, 0.05, 0.05, semi_malicious_server=True)
    t1 = 1  # one corrupt client in 20 at 5 %
    assert 2 * plus.t > plus.k + t1 + 1


# --- 3. the graph seed --------------------------------------------------------------------------


def _secaggplus() -> RoundParams:
    plus = secaggplus_params(50, 0.05, 0.05, semi_malicious_server=True)
    return _params(50, plus.t, plus.k)


def test_the_server_cannot_pick_among_the_reveals() -> None:
    params = _secaggplus()
    sim = Simulation(params, random_inputs(params), dropouts={Stage.ADVERTISE_KEYS: {7}})
    with pytest.raises(GraphSeedError, match="committed to the graph seed but did not reveal"):
        sim.run()
    assert not sim.server.transcript.releases


def test_a_client_refuses_a_commitment_list_without_its_own() -> None:
    params = _secaggplus()
    server = ActiveServer(params, random_inputs(params))
    commits = {u: c.start() for u, c in server.clients.items()}
    forged = tuple(
        (u, os.urandom(32) if u == 1 else m.commitment)  # type: ignore[union-attr]
        for u, m in sorted(commits.items())
    )
    with pytest.raises(GraphSeedError, match="omits or alters ours"):
        server.clients[1].handle(SeedCommitments(params.session_id, 1, forged))
    assert server.clients[1].aborted


def test_a_client_refuses_a_withheld_or_substituted_reveal() -> None:
    params = _secaggplus()
    server = ActiveServer(params, random_inputs(params))
    server.advertise()
    reveals = tuple((u, a.seed_reveal) for u, a in sorted(server.adverts.items()))
    for bad in (reveals[1:], ((reveals[0][0], os.urandom(32)), *reveals[1:])):
        fresh = ActiveServer(params, random_inputs(params))
        fresh.advertise()
        good = tuple((u, a.seed_reveal) for u, a in sorted(fresh.adverts.items()))
        tampered = bad if len(bad) < len(good) else ((good[0][0], bad[0][1]), *good[1:])
        with pytest.raises(GraphSeedError):
            fresh.clients[2].handle(KeysBroadcast(params.session_id, 2, (), tampered))


def test_the_graph_depends_on_every_clients_reveal() -> None:
    params = _secaggplus()
    run = simulate_round(params, random_inputs(params))
    seeds = {run.transcript.graph_seed}
    assert len(run.transcript.seed_reveals) == 50 and run.transcript.graph_seed
    for _ in range(3):
        seeds.add(simulate_round(params, random_inputs(params)).transcript.graph_seed)
    assert len(seeds) == 4  # fresh reveals, fresh graph


# --- 4. low-order keys, 5. erasure, 8. unnamed errors -------------------------------------------


LOW_ORDER = bytes(32)  # the identity point: X25519 with it gives all zeros


def test_a_low_order_key_is_refused_by_the_server_and_aborts_a_client_cleanly() -> None:
    params = _params(5, 3)
    sim = Simulation(params, random_inputs(params))
    honest = sim.clients[2].start()
    assert isinstance(honest, AdvertiseKeys)
    signed = advert_signed_bytes(
        params.session_id, 2, LOW_ORDER, honest.masking_public, honest.context_digest, b""
    )
    forged = dataclasses.replace(
        honest, encryption_public=LOW_ORDER, signature=sim.identities[2].sign(signed)
    )
    with pytest.raises(InvalidPublicKey):
        sim.server.receive(forged)
    # A server that forwards it anyway: the client aborts with a named error and wipes.
    client = sim.clients[1]
    client.start()
    peers = tuple(
        PeerAdvert(
            v,
            LOW_ORDER if v == 2 else a.encryption_public,
            a.masking_public,
            a.context_digest,
            sim.identities[2].sign(signed) if v == 2 else a.signature,
        )
        for v, a in ((v, sim.clients[v].start() if v != 2 else honest) for v in (2, 3, 4, 5))
        if isinstance(a, AdvertiseKeys)
    )
    with pytest.raises(InvalidPublicKey):
        client.handle(KeysBroadcast(params.session_id, 1, peers))
    assert client.aborted and not _private_keys(client)


def _private_keys(session: ClientSession) -> list[object]:
    """Every X25519 private key still reachable from the session object."""
    found: list[object] = []
    seen: set[int] = set()

    def walk(obj: object) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, X25519PrivateKey | AgreementKeyPair):
            found.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list | tuple | set | frozenset):
            for value in obj:
                walk(value)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                walk(value)

    walk(session)
    return found


def test_an_aborted_or_finished_client_keeps_no_key_that_reopens_its_shares() -> None:
    params = _params(5, 3)
    sim = Simulation(params, random_inputs(params))
    sim.run()
    assert all(not _private_keys(c) for c in sim.clients.values())  # after unmasking
    aborted = ActiveServer(_params(7, 4), random_inputs(_params(7, 4)))
    aborted.advertise()
    aborted.share_keys()
    aborted.masked_inputs(lambda u: (2, 3, 4) if u == 1 else [v for v in range(1, 8) if v != u])
    aborted.collect_signatures({1: (1, 5, 6, 7)})
    assert aborted.clients[1].aborted and not _private_keys(aborted.clients[1])


def test_a_client_message_given_to_a_client_is_a_named_abort() -> None:
    params = _params(4, 3)
    identities, roster = make_identities(params.cohort)
    client = ClientSession(1, identities[1], roster, params, params.ring.zeros(params.dim))
    advert = client.start()
    with pytest.raises(UnexpectedMessage, match="not a message a server sends"):
        client.handle(MaskedInput(params.session_id, 2, b""))  # type: ignore[arg-type]
    assert client.aborted
    with pytest.raises(ProtocolAbort):
        client.handle(KeysBroadcast(params.session_id, 1, ()))
    assert isinstance(advert, AdvertiseKeys)


# --- 7. the signed digest -----------------------------------------------------------------------


def test_context_digest_has_one_preimage_per_cohort_and_context() -> None:
    sid = os.urandom(32)
    four = RoundParams(sid, 32, 8, 3, (1, 2, 3, 4))
    three = RoundParams(sid, 32, 8, 3, (1, 2, 3), quorum=3)
    model = b"global model"
    # Before: P(1,2,3,4) with M and P(1,2,3) with 00000004 || M hashed to the same digest.
    assert context_digest(four, model) != context_digest(three, (4).to_bytes(4, "big") + model)
    assert four.canonical_bytes() != three.canonical_bytes()


def test_policy_values_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        ClientPolicy(corrupt_fraction=1.5)
    with pytest.raises(ConfigurationError):
        ClientPolicy(min_cohort=0)


# --- honest rounds still give the exact sum ----------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(7, None), (30, None), (60, "plus")])
def test_honest_rounds_at_the_enforced_parameters_are_exact(n: int, k: str | None) -> None:
    if k is None:
        floor = active_server_floor(n, n - 1, 0.05, 0.05)
        params = _params(n, floor.min_threshold)
    else:
        plus = secaggplus_params(n, 0.05, 0.05, semi_malicious_server=True)
        params = _params(n, plus.t, plus.k)
    inputs = random_inputs(params, n)
    dropped = set(range(2, 2 + max(1, n // 20)))  # the 5 % the parameters are sized for
    outcome = simulate_round(params, inputs, dropouts={Stage.MASKED_INPUT: dropped})
    total = params.ring.zeros(params.dim)
    for u in outcome.result.contributors:
        np.add(total, inputs[u], out=total)
    assert set(outcome.result.contributors) == set(params.cohort) - dropped
    np.testing.assert_array_equal(outcome.result.sum, params.ring.reduce(total))

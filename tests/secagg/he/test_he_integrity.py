"""The CKKS decryptor is no oracle: a server acting alone gets a release only for the plain sum
of the fresh uploads of the contributors it names, in this session.

The server here is the test: it holds what a server holds (the public context and every upload
it received, in this and earlier sessions) and uses what it can do with them: parse the
envelopes, add ciphertexts, multiply them by integers (repeated addition), and pack an aggregate
naming any contributors. Each forged aggregate must be refused with a named error and nothing
released, and the decryptor's session must be over (it opens one aggregate per session). Before
the integrity pads, every one of these forgeries was decrypted and released.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pytest
import tenseal as ts

from secagg.errors import (
    DuplicateClient,
    PolicyViolation,
    ProtocolAbort,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
)
from secagg.he import (
    AggregateIntegrityError,
    CiphertextFormatError,
    CKKSParams,
    FederationKeys,
    HeClientSession,
    HeClientStage,
    HeRoundSpec,
    HeServerSession,
    NoDecryptor,
    PublicContext,
    generate_federation_keys,
)
from secagg.he.backend import KIND_AGGREGATE, KIND_UPDATE, Envelope, pack, unpack
from secagg.he.params import MIN_INTEGRITY_BITS
from secagg.protocol import ClientPolicy

DIM = 5000  # two ciphertexts
COHORT = (1, 2, 3, 4, 5)
PARAMS = CKKSParams(clip=1.0, max_clients=5, min_contributors=3)
MODEL = b"the global model every client trained from"


@pytest.fixture(scope="module")
def keys() -> FederationKeys:
    return generate_federation_keys(PARAMS)


class Round:
    """One session: the clients' sessions, their updates and their uploads."""

    def __init__(self, keys: FederationKeys, context: bytes = MODEL) -> None:
        self.keys = keys
        self.spec = HeRoundSpec(PARAMS, os.urandom(32), COHORT, DIM, keys.fingerprint)
        rng = np.random.default_rng(list(self.spec.session_id[:4]))
        self.updates = {u: rng.uniform(-1, 1, DIM) for u in COHORT}
        self.clients = {u: HeClientSession(u, keys.secret, self.spec, context) for u in COHORT}
        self.uploads = {u: self.clients[u].encrypt(self.updates[u]) for u in COHORT}

    @property
    def decryptor(self) -> HeClientSession:
        return self.clients[self.spec.decryptor]

    def honest(self, contributors: Sequence[int]) -> bytes:
        server = HeServerSession(self.keys.public, self.spec)
        for u in contributors:
            server.receive_update(u, self.uploads[u])
        for u in set(COHORT) - set(contributors):
            server._refused.add(u)  # the test plays the upload deadline
        return server.close_uploads()


class Server:
    """The adversary: the public context and the bytes it received; no key."""

    def __init__(self, keys: FederationKeys) -> None:
        self.public = PublicContext.from_bytes(keys.public.to_bytes(), PARAMS, keys.fingerprint)

    def chunks(self, rnd: Round, u: int) -> list[ts.CKKSVector]:
        envelope = unpack(rnd.uploads[u], PARAMS, KIND_UPDATE, rnd.spec.session_id, DIM, 1)
        return [ts.ckks_vector_from(self.public.context, c) for c in envelope.chunks]

    def forge(
        self,
        spec: HeRoundSpec,
        claimed: Sequence[int],
        per_chunk: Sequence[Sequence[tuple[int, ts.CKKSVector]]],
    ) -> bytes:
        """An aggregate for ``spec`` naming ``claimed``; chunk j is Σ coefficient · ciphertext
        over ``per_chunk[j]`` (integer coefficients, by repeated addition)."""
        out = []
        for terms in per_chunk:
            total: ts.CKKSVector | None = None
            for coefficient, vector in terms:
                for _ in range(coefficient):
                    if total is None:  # a copy (TenSEAL's copy() wants the secret key)
                        total = ts.ckks_vector_from(self.public.context, vector.serialize())
                    else:
                        total.add_(vector)
            assert total is not None
            out.append(bytes(total.serialize()))
        envelope = Envelope(
            KIND_AGGREGATE,
            spec.session_id,
            self.public.fingerprint,
            PARAMS.encoded_dim(DIM),
            tuple(claimed),
            tuple(out),
        )
        return pack(envelope)

    def combine(
        self, spec: HeRoundSpec, claimed: Sequence[int], terms: Sequence[tuple[int, list]]
    ) -> bytes:
        """The same combination in every chunk."""
        chunks = PARAMS.chunk_count(DIM)
        return self.forge(spec, claimed, [[(k, c[j]) for k, c in terms] for j in range(chunks)])


def _refused(
    rnd: Round, aggregate: bytes, error: type[Exception] = AggregateIntegrityError
) -> None:
    with pytest.raises(error):
        rnd.decryptor.decrypt(aggregate)
    # Nothing was released, and the session is over: not even the honest sum comes out now.
    assert rnd.decryptor.stage is HeClientStage.ABORTED
    with pytest.raises(UnexpectedMessage):
        rnd.decryptor.decrypt(rnd.honest(COHORT))


def test_the_honest_sum_is_released(keys: FederationKeys) -> None:
    rnd = Round(keys)
    released = rnd.decryptor.decrypt(rnd.honest((1, 2, 4)))
    exact = sum(np.clip(rnd.updates[u], -1, 1) for u in (1, 2, 4))
    assert released.contributors == 3
    assert np.abs(released.total - exact).max() <= PARAMS.release_step(3) + 4e-7
    # One release per session.
    with pytest.raises(UnexpectedMessage):
        rnd.decryptor.decrypt(rnd.honest((1, 2, 4)))


@pytest.mark.parametrize("k", [3, 5])
def test_one_upload_scaled_by_k_as_an_aggregate_of_k(keys: FederationKeys, k: int) -> None:
    rnd, server = Round(keys), Server(keys)
    _refused(rnd, server.combine(rnd.spec, COHORT[:k], [(k, server.chunks(rnd, 2))]))


def test_an_upload_replayed_from_an_earlier_session(keys: FederationKeys) -> None:
    server = Server(keys)
    old = Round(keys)
    old_chunks = server.chunks(old, 2)
    # Alone, scaled to look like a sum of three...
    rnd = Round(keys)
    _refused(rnd, server.combine(rnd.spec, (1, 2, 3), [(3, old_chunks)]))
    # ...or in place of client 2's fresh upload in an otherwise honest sum.
    rnd = Round(keys)
    fresh = [(1, server.chunks(rnd, 1)), (1, old_chunks), (1, server.chunks(rnd, 3))]
    _refused(rnd, server.combine(rnd.spec, (1, 2, 3), fresh))
    # ...or added on top of the honest sum, to difference it out of the release.
    rnd = Round(keys)
    extra = [(1, server.chunks(rnd, u)) for u in (1, 2, 3)] + [(1, old_chunks)]
    _refused(rnd, server.combine(rnd.spec, (1, 2, 3), extra))


def test_chunks_swapped_or_mixed_between_uploads(keys: FederationKeys) -> None:
    server = Server(keys)
    rnd = Round(keys)
    c = {u: server.chunks(rnd, u) for u in (1, 2, 3)}
    # Ciphertext 1 of client 2 replaced by client 1's ciphertext 1.
    mixed = [[(1, c[u][0]) for u in (1, 2, 3)], [(2, c[1][1]), (1, c[3][1])]]
    _refused(rnd, server.forge(rnd.spec, (1, 2, 3), mixed))
    # Client 1's two ciphertexts exchanged (both are full: same size).
    rnd = Round(keys)
    c = {u: server.chunks(rnd, u) for u in (1, 2, 3)}
    moved = [[(1, c[1][1]), (1, c[2][0]), (1, c[3][0])], [(1, c[1][0]), (1, c[2][1]), (1, c[3][1])]]
    _refused(rnd, server.forge(rnd.spec, (1, 2, 3), moved))
    # Honest in one ciphertext, client 1 alone (times 3) in the other.
    rnd = Round(keys)
    c = {u: server.chunks(rnd, u) for u in (1, 2, 3)}
    split = [[(1, c[u][0]) for u in (1, 2, 3)], [(3, c[1][1])]]
    _refused(rnd, server.forge(rnd.spec, (1, 2, 3), split))


def test_a_claimed_set_larger_than_the_uploads_summed(keys: FederationKeys) -> None:
    rnd, server = Round(keys), Server(keys)
    summed = [(1, server.chunks(rnd, u)) for u in (1, 2)]
    _refused(rnd, server.combine(rnd.spec, (1, 2, 3), summed))


def test_an_aggregate_missing_one_claimed_contributor(keys: FederationKeys) -> None:
    # Claims 1, 2, 3, 4; adds 1, 2, 3 and, in 4's place, 5's upload (or 3's twice).
    for stand_in in (5, 3):
        rnd, server = Round(keys), Server(keys)
        summed = [(1, server.chunks(rnd, u)) for u in (1, 2, 3, stand_in)]
        _refused(rnd, server.combine(rnd.spec, (1, 2, 3, 4), summed))


def test_an_upload_added_but_not_claimed(keys: FederationKeys) -> None:
    rnd, server = Round(keys), Server(keys)
    summed = [(1, server.chunks(rnd, u)) for u in (1, 2, 3, 4)]
    _refused(rnd, server.combine(rnd.spec, (1, 2, 3), summed))


def test_a_contributor_shown_another_model_or_cohort(keys: FederationKeys) -> None:
    """Every contributor's pads bind its view: a client shown another model (or another cohort)
    contributes to no sum the decryptor accepts."""
    rnd = Round(keys)
    other = HeClientSession(2, keys.secret, rnd.spec, b"another model")
    rnd.uploads[2] = other.encrypt(rnd.updates[2])
    _refused(rnd, rnd.honest((1, 2, 3)))

    rnd = Round(keys)
    spec = HeRoundSpec(PARAMS, rnd.spec.session_id, (2, 3, 4, 5), DIM, keys.fingerprint)
    # Client 2 is told it decrypts a round of 2..5 under the same session id; its upload is
    # still refused in client 1's sum, and the two views give disjoint contributor sets.
    rnd.uploads[2] = HeClientSession(2, keys.secret, spec, MODEL).encrypt(rnd.updates[2])
    _refused(rnd, rnd.honest((1, 2, 3)))


@pytest.mark.parametrize(
    ("claimed", "error"),
    [
        ((1, 2, 2), DuplicateClient),
        ((2, 1, 3), CiphertextFormatError),
        ((1, 2, 6), UnknownClient),
        ((1, 2), TooFewSurvivors),
    ],
)
def test_a_claimed_set_that_is_not_a_set_of_the_cohort(
    keys: FederationKeys, claimed: tuple[int, ...], error: type[Exception]
) -> None:
    rnd, server = Round(keys), Server(keys)
    summed = [(1, server.chunks(rnd, u)) for u in sorted(set(claimed) & set(COHORT))]
    _refused(rnd, server.combine(rnd.spec, claimed, summed), error)


def test_only_the_named_decryptor_opens_and_only_after_uploading(keys: FederationKeys) -> None:
    rnd = Round(keys)
    aggregate = rnd.honest(COHORT)
    assert rnd.spec.decryptor == 1
    with pytest.raises(UnexpectedMessage, match="not this round's decryptor"):
        rnd.clients[2].decrypt(aggregate)
    assert rnd.clients[2].stage is HeClientStage.ABORTED
    fresh = HeClientSession(1, keys.secret, rnd.spec, MODEL)
    with pytest.raises(UnexpectedMessage, match="before this client uploaded"):
        fresh.decrypt(aggregate)
    # A server whose decryptor did not upload releases nothing (and asks nobody else).
    server = HeServerSession(keys.public, rnd.spec)
    for u in (2, 3, 4):
        server.receive_update(u, rnd.uploads[u])
    with pytest.raises(NoDecryptor):
        server.close_uploads()
    assert server.stage.value == "aborted"


def test_policy_refuses_a_small_cohort_or_a_low_release_floor(keys: FederationKeys) -> None:
    spec = HeRoundSpec(PARAMS, os.urandom(32), COHORT, DIM, keys.fingerprint)
    with pytest.raises(PolicyViolation, match="cohort of 5 < policy minimum 6"):
        HeClientSession(1, keys.secret, spec, policy=ClientPolicy(min_cohort=6))
    with pytest.raises(PolicyViolation, match="min_contributors = 3 < policy minimum 4"):
        HeClientSession(1, keys.secret, spec, policy=ClientPolicy(min_threshold=4))
    with pytest.raises(PolicyViolation, match="not in the cohort"):
        HeClientSession(9, keys.secret, spec)
    # The policy's floor also applies to the claimed set when it is above the round's.
    rnd = Round(keys)
    strict = HeClientSession(1, keys.secret, rnd.spec, MODEL, ClientPolicy(min_threshold=3))
    strict.encrypt(rnd.updates[1])
    assert strict.decrypt(rnd.honest((1, 2, 3))).contributors == 3


def test_honest_rounds_with_random_cohorts_and_dropouts(keys: FederationKeys) -> None:
    rng = np.random.default_rng(2024)
    params = CKKSParams(clip=0.5, max_clients=8, max_weight=40, weighted=True, min_contributors=3)
    keys8 = generate_federation_keys(params)
    for _ in range(4):
        n = int(rng.integers(3, 9))
        cohort = tuple(sorted(int(u) for u in rng.choice(np.arange(1, 50), n, replace=False)))
        dim = int(rng.integers(1, 9000))
        spec = HeRoundSpec(params, os.urandom(32), cohort, dim, keys8.fingerprint)
        server = HeServerSession(keys8.public, spec)
        # Any dropouts leaving at least min_contributors, never the decryptor.
        kept = [cohort[0], *[u for u in cohort[1:] if rng.random() < 0.7]]
        while len(kept) < 3:
            kept.append(next(u for u in cohort if u not in kept))
        clients = {u: HeClientSession(u, keys8.secret, spec, b"m") for u in cohort}
        updates = {u: rng.normal(0, 0.3, dim) for u in cohort}
        weights = {u: int(rng.integers(1, 41)) for u in cohort}
        for u in kept:
            server.receive_update(u, clients[u].encrypt(updates[u], weights[u]))
        released = clients[cohort[0]].decrypt(server.close_uploads())
        server.receive_release(cohort[0], released)
        exact = sum(weights[u] * np.clip(updates[u], -0.5, 0.5) for u in kept)
        m = len(kept)
        bound = params.sum_error_bound(m) + params.release_step(m) / 2
        assert released.weight == sum(weights[u] for u in kept)
        assert released.contributors == m == len(set(kept))
        assert np.all(np.abs(released.total - exact) <= bound + 2**-24 * np.abs(exact) + 1e-12)


def test_the_forgery_bound_meets_the_requirement() -> None:
    """Every parameter set the backend builds bounds a forgery by 2^-40 per attempt or better,
    down to the smallest scale SEAL allows."""
    for params in (
        PARAMS,
        CKKSParams(clip=1.0, max_clients=2, scale_bits=20),
        CKKSParams(clip=0.01, max_clients=3, scale_bits=20),
        CKKSParams(clip=1.0, max_clients=100, max_weight=10**6, weighted=True, scale_bits=20),
    ):
        assert params.forgery_bits >= MIN_INTEGRITY_BITS
    assert PARAMS.forgery_bits > 100


def test_a_refused_release_aborts_the_server_round(keys: FederationKeys) -> None:
    rnd = Round(keys)
    server = HeServerSession(keys.public, rnd.spec)
    for u in (1, 2, 3):
        server.receive_update(u, rnd.uploads[u])
    released = rnd.decryptor.decrypt(server.close_uploads())
    with pytest.raises(UnexpectedMessage):
        server.receive_release(2, released)
    forged = type(released)(released.total, released.weight, released.contributors + 1)
    with pytest.raises(ProtocolAbort, match="counts 4 contributors"):
        server.receive_release(1, forged)
    with pytest.raises(TooFewSurvivors):
        server.result  # noqa: B018 - nothing released


def test_a_data_slot_beyond_what_an_honest_sum_reaches(keys: FederationKeys) -> None:
    """The server can add a plaintext of its choice; in the tag slots that breaks the tags, in
    the data slots it must stay within the range of an honest sum (a known shift there reveals
    nothing the server did not know)."""
    rnd, server = Round(keys), Server(keys)
    c = {u: server.chunks(rnd, u) for u in (1, 2, 3)}
    shift = np.zeros(PARAMS.slots)
    # A data slot of ciphertext 0 only; the honest sum there is within ±3V, so it lands beyond.
    shift[7] = 2 * 3 * PARAMS.client_bound + 1.0
    first = c[1][0] + shift.tolist()
    honest_shifted = [[(1, first), (1, c[2][0]), (1, c[3][0])], [(1, c[u][1]) for u in (1, 2, 3)]]
    with pytest.raises(AggregateIntegrityError, match="beyond the"):
        rnd.decryptor.decrypt(server.forge(rnd.spec, (1, 2, 3), honest_shifted))
    assert rnd.decryptor.stage is HeClientStage.ABORTED

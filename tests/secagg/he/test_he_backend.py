"""CKKS aggregation backend: precision, weighting, dropouts, key custody, rejections."""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
import pytest
import tenseal as ts

from secagg.errors import (
    ConfigurationError,
    DecryptionError,
    DuplicateClient,
    EncodingError,
    InvalidSignatureError,
    SessionMismatch,
    TooFewSurvivors,
)
from secagg.he import (
    CiphertextFormatError,
    CKKSParams,
    ContextMismatch,
    FederationKeys,
    HEAggregator,
    HeClientSession,
    HeRoundSpec,
    HeServerSession,
    KeyAnnouncement,
    PublicContext,
    generate_federation_keys,
    open_secret_context,
    seal_secret_context,
    security_level,
)
from secagg.he.backend import unpack
from secagg.he.params import TAG_SLOTS
from secagg.keys import AgreementKeyPair, Identity, Roster
from secagg.protocol import ClientPolicy

DIM = 5000  # two ciphertexts at N = 8192, the second partly filled
COHORT = tuple(range(1, 13))
#: These tests exercise the arithmetic, also with cohorts of 2 (the default policy needs 3).
POLICY = ClientPolicy(min_cohort=2)


@pytest.fixture(scope="module")
def params() -> CKKSParams:
    return CKKSParams(clip=1.0, max_clients=12)


@pytest.fixture(scope="module")
def keys(params: CKKSParams) -> FederationKeys:
    return generate_federation_keys(params)


def _spec(
    keys: FederationKeys,
    params: CKKSParams,
    cohort: tuple[int, ...] = COHORT,
    dim: int = DIM,
    session: bytes | None = None,
) -> HeRoundSpec:
    return HeRoundSpec(params, session or os.urandom(32), cohort, dim, keys.fingerprint)


def _server(keys: FederationKeys, spec: HeRoundSpec) -> HeServerSession:
    # The server loads the public context from the bytes the dealer sent, like a real server.
    public = PublicContext.from_bytes(keys.public.to_bytes(), spec.params, keys.fingerprint)
    return HeServerSession(public, spec)


def _clients(keys: FederationKeys, spec: HeRoundSpec) -> dict[int, HeClientSession]:
    return {u: HeClientSession(u, keys.secret, spec, policy=POLICY) for u in spec.cohort}


def _allowed_error(params: CKKSParams, n: int, exact: npt.NDArray[np.float64]) -> np.ndarray:
    # CKKS error bound plus the release grid (half a step) plus float32 output rounding.
    slack = params.sum_error_bound(n) + params.release_step(n) / 2
    return np.asarray(slack + np.abs(exact) * float(np.finfo(np.float32).eps))


@pytest.mark.parametrize("n", [2, 5, 12])
def test_sum_matches_plaintext_within_ckks_bound(
    keys: FederationKeys, params: CKKSParams, n: int
) -> None:
    rng = np.random.default_rng(n)
    spec = _spec(keys, params, cohort=tuple(range(1, n + 1)))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    updates = {u: rng.normal(0, 0.3, DIM).astype(np.float32) for u in spec.cohort}
    for u, update in updates.items():
        server.receive_update(u, clients[u].encrypt(update))
    result = clients[spec.decryptor].decrypt(server.close_uploads())
    exact = np.clip(np.array(list(updates.values()), dtype=np.float64), -1.0, 1.0).sum(axis=0)
    assert result.total.dtype == np.float32 and result.total.shape == (DIM,)
    assert result.contributors == n and result.weight == n
    error = np.abs(result.total.astype(np.float64) - exact)
    assert (error <= _allowed_error(params, n, exact)).all()
    # The bound is meaningful: the error is far below the quantization step of float32 updates
    # near 1 and the sum is not trivially zero.
    assert params.sum_error_bound(n) < 1e-7
    assert np.abs(exact).max() > 0.5


def test_values_outside_clip_are_clipped(keys: FederationKeys, params: CKKSParams) -> None:
    spec = _spec(keys, params, cohort=(1, 2))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    big = np.full(DIM, 7.5, dtype=np.float32)
    server.receive_update(1, clients[1].encrypt(big))
    server.receive_update(2, clients[2].encrypt(-big / 10))
    total = clients[1].decrypt(server.close_uploads()).total
    np.testing.assert_allclose(total, 1.0 - 0.75, atol=1e-6)


def test_weighted_average() -> None:
    # Weights up to 1000 and their pads need 4 bits of scale less than the default 2^40.
    params = CKKSParams(clip=2.0, max_clients=4, max_weight=1000, weighted=True, scale_bits=36)
    keys = generate_federation_keys(params)
    spec = _spec(keys, params, cohort=(1, 2, 3))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    rng = np.random.default_rng(7)
    updates = [rng.uniform(-1, 1, DIM).astype(np.float32) for _ in range(3)]
    weights = [10, 250, 999]
    for sender, (update, weight) in enumerate(zip(updates, weights, strict=True), start=1):
        server.receive_update(sender, clients[sender].encrypt(update, weight))
    result = clients[1].decrypt(server.close_uploads())
    assert result.weight == sum(weights)
    expected = np.sum(
        [w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)], axis=0
    )
    assert (np.abs(result.total - expected) <= _allowed_error(params, 3, expected)).all()
    np.testing.assert_allclose(result.average(), expected / sum(weights), atol=1e-6)
    with pytest.raises(EncodingError):
        HeClientSession(2, keys.secret, spec, policy=POLICY).encrypt(updates[0], 1001)


def test_dropped_client_does_not_stop_the_round(keys: FederationKeys, params: CKKSParams) -> None:
    spec = _spec(keys, params, cohort=(1, 2, 3, 4))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    rng = np.random.default_rng(3)
    updates = {cid: rng.normal(0, 0.1, DIM).astype(np.float32) for cid in (1, 2, 3, 4)}
    for cid in (1, 2, 4):  # client 3 never uploads
        server.receive_update(cid, clients[cid].encrypt(updates[cid]))
    assert server.contributors == (1, 2, 4) and server.pending == {3}
    result = clients[1].decrypt(server.close_uploads())
    assert result.contributors == 3
    exact = np.sum([updates[c].astype(np.float64) for c in (1, 2, 4)], axis=0)
    assert (np.abs(result.total - exact) <= _allowed_error(params, 3, exact)).all()


def test_too_few_uploads_release_nothing(keys: FederationKeys, params: CKKSParams) -> None:
    spec = _spec(keys, params, cohort=(1, 2, 3))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    server.receive_update(1, clients[1].encrypt(np.zeros(DIM, dtype=np.float32)))
    with pytest.raises(TooFewSurvivors):
        server.close_uploads()


def test_server_cannot_decrypt(keys: FederationKeys, params: CKKSParams) -> None:
    spec = _spec(keys, params, cohort=(1, 2))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    ones = np.ones(DIM, dtype=np.float32)
    upload = clients[1].encrypt(ones)
    server.receive_update(1, upload)
    server.receive_update(2, clients[2].encrypt(ones))
    public = PublicContext.from_bytes(keys.public.to_bytes(), params, keys.fingerprint)
    context = public.context
    assert not context.is_private() and not context.has_galois_keys()
    # What the server would store on disk: reload it and it still holds no secret key.
    assert not ts.context_from(public.to_bytes()).is_private()
    # Decrypting an upload with the server's context fails.
    envelope = unpack(upload, params, 1, spec.session_id, DIM, 1)
    vector = ts.ckks_vector_from(context, envelope.chunks[0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    # A context carrying the secret key is refused as a server context.
    secret_bytes = keys.secret.context.serialize(save_secret_key=True)
    with pytest.raises(ConfigurationError, match="secret key"):
        PublicContext.from_bytes(secret_bytes, params)
    # The tag key is in no byte the server holds.
    assert keys.secret.tag_key not in public.to_bytes()
    assert clients[1].decrypt(server.close_uploads()).contributors == 2


def test_every_ciphertext_is_full_with_tag_slots(keys: FederationKeys, params: CKKSParams) -> None:
    """Layout: data fills the first N/2 - TAG_SLOTS slots of each ciphertext; all slots exist."""
    assert params.data_slots == params.slots - TAG_SLOTS
    assert params.chunk_count(params.data_slots) == 1
    assert params.chunk_count(params.data_slots + 1) == 2
    spec = _spec(keys, params, cohort=(1, 2), dim=10)
    upload = HeClientSession(1, keys.secret, spec, policy=POLICY).encrypt(np.ones(10))
    (chunk,) = unpack(upload, params, 1, spec.session_id, 10, 1).chunks
    loaded = ts.ckks_vector_from(keys.secret.context, chunk)
    assert loaded.size() == params.slots
    # Every slot, data or not, carries the pad: none decrypts to its plain value.
    plain = np.asarray(loaded.decrypt())
    assert np.abs(plain[:10] - 1.0).min() > 1e-3 and np.abs(plain[10:]).min() > 1e-3
    assert np.abs(plain).max() <= params.pad_bound + 1.0


def test_ciphertext_from_another_context_rejected_before_adding(
    keys: FederationKeys, params: CKKSParams
) -> None:
    other = generate_federation_keys(params)
    assert other.fingerprint != keys.fingerprint
    spec = _spec(keys, params, cohort=(1, 2, 3))
    theirs_spec = _spec(other, params, cohort=(1, 2, 3), session=spec.session_id)
    server = _server(keys, spec)
    ours = _clients(keys, spec)
    theirs = _clients(other, theirs_spec)
    server.receive_update(1, ours[1].encrypt(np.full(DIM, 0.5, dtype=np.float32)))
    with pytest.raises(ContextMismatch):
        server.receive_update(2, theirs[2].encrypt(np.full(DIM, 0.25, dtype=np.float32)))
    server.receive_update(3, ours[3].encrypt(np.full(DIM, 0.25, dtype=np.float32)))
    assert server.contributors == (1, 3)
    aggregate = server.close_uploads()
    # The other federation's key holder cannot open our aggregate.
    theirs[1].encrypt(np.zeros(DIM, dtype=np.float32))
    with pytest.raises(ContextMismatch):
        theirs[1].decrypt(aggregate)
    np.testing.assert_allclose(ours[1].decrypt(aggregate).total, 0.75, atol=1e-6)
    # A session is only ever built over the federation key it names.
    with pytest.raises(ContextMismatch):
        HeClientSession(1, other.secret, spec, policy=POLICY)
    with pytest.raises(ContextMismatch):
        HeServerSession(other.public, spec)


def test_garbled_and_misrouted_uploads_give_clear_errors(
    keys: FederationKeys, params: CKKSParams
) -> None:
    spec = _spec(keys, params, cohort=(1, 2, 9))
    clients = _clients(keys, spec)
    server = _server(keys, spec)
    good = clients[1].encrypt(np.full(DIM, 0.5, dtype=np.float32))
    body = bytearray(good)
    body[200:260] = os.urandom(60)  # inside the first ciphertext's serialization
    bad_inputs = [b"", good[:50], good[:-1], good + b"\x00", bytes(body), b"XXXX" + good[4:]]
    aggregator = HEAggregator(server_public(keys, params), spec.session_id, DIM)
    for bad in bad_inputs:
        with pytest.raises(CiphertextFormatError):
            aggregator.add(1, bad)
    with pytest.raises(CiphertextFormatError, match="names client 1 as its sender"):
        aggregator.add(9, good)  # client 1's upload claimed by client 9
    with pytest.raises(CiphertextFormatError):
        HEAggregator(server_public(keys, params), spec.session_id, DIM + 1).add(1, good)
    with pytest.raises(SessionMismatch):
        HEAggregator(server_public(keys, params), os.urandom(32), DIM).add(1, good)
    assert aggregator.contributors == ()
    server.receive_update(1, good)
    with pytest.raises(DuplicateClient):
        server.receive_update(1, good)
    server.receive_update(2, clients[2].encrypt(np.full(DIM, 0.5, dtype=np.float32)))
    np.testing.assert_allclose(clients[1].decrypt(server.close_uploads()).total, 1.0, atol=1e-6)


def server_public(keys: FederationKeys, params: CKKSParams) -> PublicContext:
    return PublicContext.from_bytes(keys.public.to_bytes(), params, keys.fingerprint)


def test_bad_updates_refused(keys: FederationKeys, params: CKKSParams) -> None:
    spec = _spec(keys, params, cohort=(1, 2))
    for bad, weight in [
        (np.zeros(DIM + 1, dtype=np.float32), 1),
        (np.full(DIM, np.nan, dtype=np.float32), 1),
        (np.zeros(DIM, dtype=np.int32), 1),
        (np.zeros(DIM, dtype=np.float32), 2),  # unweighted round
    ]:
        with pytest.raises(EncodingError):
            HeClientSession(1, keys.secret, spec, policy=POLICY).encrypt(bad, weight)


def test_parameters_below_128_bits_refused() -> None:
    assert security_level(8192, 120) == 192
    assert security_level(8192, 218) == 128
    assert security_level(4096, 58) == 256
    with pytest.raises(ConfigurationError, match="128-bit"):
        security_level(8192, 219)
    with pytest.raises(ConfigurationError, match="128-bit"):
        CKKSParams(clip=1.0, max_clients=2, poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 50))
    with pytest.raises(ConfigurationError):
        CKKSParams(clip=1.0, max_clients=2, poly_modulus_degree=3000)
    # The data modulus must hold the worst-case sum, pads included, at the chosen scale.
    with pytest.raises(ConfigurationError, match="scale_bits"):
        CKKSParams(clip=1.0, max_clients=100, max_weight=10**4, weighted=True)
    with pytest.raises(ConfigurationError, match="integrity pads"):
        CKKSParams(clip=1.0, max_clients=200)  # 200 pads of 2^12 do not fit at scale 2^40
    assert CKKSParams(clip=1.0, max_clients=10).security_bits == 192


def test_secret_context_distribution() -> None:
    params = CKKSParams(clip=1.0, max_clients=4)
    dealer_id, member_id, session = 11, 7, os.urandom(32)
    dealer_identity, member_identity = Identity.generate(), Identity.generate()
    roster = Roster(
        {dealer_id: dealer_identity.public_bytes, member_id: member_identity.public_bytes}
    )
    keys = generate_federation_keys(params)
    dealer_x, member_x = AgreementKeyPair.generate(), AgreementKeyPair.generate()
    dealer_ann = KeyAnnouncement.create(
        dealer_identity, session, dealer_id, dealer_x, keys.fingerprint
    )
    member_ann = KeyAnnouncement.create(member_identity, session, member_id, member_x)
    sealed = seal_secret_context(keys, dealer_x, dealer_ann, member_ann, roster)
    assert keys.secret.context.serialize(save_secret_key=True)[:64] not in sealed
    assert keys.secret.tag_key not in sealed
    secret = open_secret_context(sealed, member_x, member_id, dealer_ann, roster, params)
    assert secret.context.is_private() and secret.fingerprint == keys.fingerprint
    assert secret.tag_key == keys.secret.tag_key  # the same pads: the same federation

    # The member's key opens what the dealer encrypts: same federation key and tag key.
    spec = HeRoundSpec(params, os.urandom(32), (member_id, dealer_id), 10, keys.fingerprint)
    server = HeServerSession(
        PublicContext.from_bytes(keys.public.to_bytes(), params, dealer_ann.fingerprint), spec
    )
    dealer = HeClientSession(dealer_id, keys.secret, spec, policy=POLICY)
    server.receive_update(dealer_id, dealer.encrypt(np.ones(10)))
    member = HeClientSession(member_id, secret, spec, policy=POLICY)  # lowest id: decryptor
    server.receive_update(member_id, member.encrypt(np.ones(10)))
    np.testing.assert_allclose(member.decrypt(server.close_uploads()).total, 2.0, atol=1e-6)

    # A server that swaps in its own X25519 key cannot produce a valid member announcement.
    server_x = AgreementKeyPair.generate()
    forged = KeyAnnouncement(
        session, member_id, server_x.public_bytes, member_ann.fingerprint, member_ann.signature
    )
    with pytest.raises(InvalidSignatureError):
        seal_secret_context(keys, dealer_x, dealer_ann, forged, roster)
    # Sealed for another recipient, or tampered: authentication fails.
    with pytest.raises(DecryptionError):
        open_secret_context(
            sealed[:-1] + bytes([sealed[-1] ^ 1]), member_x, member_id, dealer_ann, roster, params
        )
    # A public context other than the one the dealer signed is refused.
    other = generate_federation_keys(params)
    with pytest.raises(ContextMismatch):
        PublicContext.from_bytes(other.public.to_bytes(), params, dealer_ann.fingerprint)

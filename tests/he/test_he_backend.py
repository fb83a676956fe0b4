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
    HEClient,
    KeyAnnouncement,
    PublicContext,
    generate_federation_keys,
    open_secret_context,
    seal_secret_context,
    security_level,
)
from secagg.keys import AgreementKeyPair, Identity, Roster

DIM = 5000  # two ciphertexts at N = 8192, the second partly filled


@pytest.fixture(scope="module")
def params() -> CKKSParams:
    return CKKSParams(clip=1.0, max_clients=12)


@pytest.fixture(scope="module")
def keys(params: CKKSParams) -> FederationKeys:
    return generate_federation_keys(params)


def _server(
    keys: FederationKeys, params: CKKSParams, session: bytes, dim: int = DIM
) -> HEAggregator:
    # The server loads the public context from the bytes the dealer sent, like a real server.
    public = PublicContext.from_bytes(keys.public.to_bytes(), params, keys.fingerprint)
    return HEAggregator(public, session, dim)


def _allowed_error(params: CKKSParams, n: int, exact: npt.NDArray[np.float64]) -> np.ndarray:
    # CKKS error bound plus the release grid (half a step) plus float32 output rounding.
    slack = params.sum_error_bound(n) + params.release_step(n) / 2
    return np.asarray(slack + np.abs(exact) * float(np.finfo(np.float32).eps))


@pytest.mark.parametrize("n", [2, 5, 12])
def test_sum_matches_plaintext_within_ckks_bound(
    keys: FederationKeys, params: CKKSParams, n: int
) -> None:
    rng = np.random.default_rng(n)
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    updates = [rng.normal(0, 0.3, DIM).astype(np.float32) for _ in range(n)]
    for sender, update in enumerate(updates, start=1):
        server.add(sender, client.encrypt_update(update))
    result = client.decrypt_sum(server.aggregate())
    exact = np.clip(np.array(updates, dtype=np.float64), -1.0, 1.0).sum(axis=0)
    assert result.total.dtype == np.float32 and result.total.shape == (DIM,)
    assert result.contributors == n and result.weight == n
    error = np.abs(result.total.astype(np.float64) - exact)
    assert (error <= _allowed_error(params, n, exact)).all()
    # The bound is meaningful: the error is far below the quantization step of float32 updates
    # near 1 and the sum is not trivially zero.
    assert params.sum_error_bound(n) < 1e-7
    assert np.abs(exact).max() > 0.5


def test_values_outside_clip_are_clipped(keys: FederationKeys, params: CKKSParams) -> None:
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    big = np.full(DIM, 7.5, dtype=np.float32)
    server.add(1, client.encrypt_update(big))
    server.add(2, client.encrypt_update(-big / 10))
    total = client.decrypt_sum(server.aggregate()).total
    np.testing.assert_allclose(total, 1.0 - 0.75, atol=1e-6)


def test_weighted_average() -> None:
    params = CKKSParams(clip=2.0, max_clients=4, max_weight=1000, weighted=True)
    keys = generate_federation_keys(params)
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    rng = np.random.default_rng(7)
    updates = [rng.uniform(-1, 1, DIM).astype(np.float32) for _ in range(3)]
    weights = [10, 250, 999]
    for sender, (update, weight) in enumerate(zip(updates, weights, strict=True), start=1):
        server.add(sender, client.encrypt_update(update, weight))
    result = client.decrypt_sum(server.aggregate())
    assert result.weight == sum(weights)
    expected = np.sum(
        [w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)], axis=0
    )
    assert (np.abs(result.total - expected) <= _allowed_error(params, 3, expected)).all()
    np.testing.assert_allclose(result.average(), expected / sum(weights), atol=1e-6)
    with pytest.raises(EncodingError):
        client.encrypt_update(updates[0], 1001)


def test_dropped_client_does_not_stop_the_round(keys: FederationKeys, params: CKKSParams) -> None:
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    rng = np.random.default_rng(3)
    updates = {cid: rng.normal(0, 0.1, DIM).astype(np.float32) for cid in (1, 2, 3, 4)}
    for cid in (1, 2, 4):  # client 3 never uploads
        server.add(cid, client.encrypt_update(updates[cid]))
    assert server.contributors == (1, 2, 4)
    result = client.decrypt_sum(server.aggregate())
    assert result.contributors == 3
    exact = np.sum([updates[c].astype(np.float64) for c in (1, 2, 4)], axis=0)
    assert (np.abs(result.total - exact) <= _allowed_error(params, 3, exact)).all()


def test_too_few_uploads_release_nothing(keys: FederationKeys, params: CKKSParams) -> None:
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    server.add(1, client.encrypt_update(np.zeros(DIM, dtype=np.float32)))
    with pytest.raises(TooFewSurvivors):
        server.aggregate()


def test_server_cannot_decrypt(keys: FederationKeys, params: CKKSParams) -> None:
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    server.add(1, client.encrypt_update(np.ones(DIM, dtype=np.float32)))
    server.add(2, client.encrypt_update(np.ones(DIM, dtype=np.float32)))
    context = server.public.context
    assert not context.is_private()
    # What the server would store on disk: reload it and it still holds no secret key.
    stored = server.public.to_bytes()
    assert not ts.context_from(stored).is_private()
    # Decrypting the aggregate with the server's context fails.
    aggregate = server.aggregate()
    chunk = client.encrypt_update(np.ones(DIM, dtype=np.float32))
    vector = ts.ckks_vector_from(context, _first_chunk(chunk))
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    # A context carrying the secret key is refused as a server context.
    secret_bytes = keys.secret.context.serialize(save_secret_key=True)
    with pytest.raises(ConfigurationError, match="secret key"):
        PublicContext.from_bytes(secret_bytes, params)
    assert client.decrypt_sum(aggregate).contributors == 2


def _first_chunk(envelope: bytes) -> bytes:
    # Envelope layout: 4+1+1+32+32+4+4+4 header bytes, then one u32 length per chunk.
    header = 82
    count = int.from_bytes(envelope[78:82], "big")
    first = int.from_bytes(envelope[header : header + 4], "big")
    start = header + 4 * count
    return envelope[start : start + first]


def test_ciphertext_from_another_context_rejected_before_adding(
    keys: FederationKeys, params: CKKSParams
) -> None:
    other = generate_federation_keys(params)
    assert other.fingerprint != keys.fingerprint
    session = os.urandom(32)
    server = _server(keys, params, session)
    ours = HEClient(keys.secret, session, DIM)
    theirs = HEClient(other.secret, session, DIM)
    server.add(1, ours.encrypt_update(np.full(DIM, 0.5, dtype=np.float32)))
    with pytest.raises(ContextMismatch):
        server.add(2, theirs.encrypt_update(np.full(DIM, 0.25, dtype=np.float32)))
    server.add(3, ours.encrypt_update(np.full(DIM, 0.25, dtype=np.float32)))
    assert server.contributors == (1, 3)
    np.testing.assert_allclose(ours.decrypt_sum(server.aggregate()).total, 0.75, atol=1e-6)
    # The other federation's key holder cannot open our aggregate either.
    with pytest.raises(ContextMismatch):
        theirs.decrypt_sum(server.aggregate())


def test_garbled_and_misrouted_uploads_give_clear_errors(
    keys: FederationKeys, params: CKKSParams
) -> None:
    session = os.urandom(32)
    client = HEClient(keys.secret, session, DIM)
    server = _server(keys, params, session)
    good = client.encrypt_update(np.full(DIM, 0.5, dtype=np.float32))
    body = bytearray(good)
    body[200:260] = os.urandom(60)  # inside the first ciphertext's serialization
    bad_inputs = [b"", good[:50], good[:-1], good + b"\x00", bytes(body), b"XXXX" + good[4:]]
    for bad in bad_inputs:
        with pytest.raises(CiphertextFormatError):
            server.add(9, bad)
    with pytest.raises(CiphertextFormatError):
        HEAggregator(server.public, session, DIM + 1).add(9, good)
    with pytest.raises(SessionMismatch):
        HEAggregator(server.public, os.urandom(32), DIM).add(9, good)
    assert server.contributors == ()
    server.add(1, good)
    with pytest.raises(DuplicateClient):
        server.add(1, good)
    server.add(2, good)
    np.testing.assert_allclose(client.decrypt_sum(server.aggregate()).total, 1.0, atol=1e-6)


def test_bad_updates_refused(keys: FederationKeys) -> None:
    client = HEClient(keys.secret, os.urandom(32), DIM)
    with pytest.raises(EncodingError):
        client.encrypt_update(np.zeros(DIM + 1, dtype=np.float32))
    with pytest.raises(EncodingError):
        client.encrypt_update(np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(EncodingError):
        client.encrypt_update(np.zeros(DIM, dtype=np.int32))
    with pytest.raises(EncodingError):
        client.encrypt_update(np.zeros(DIM, dtype=np.float32), weight=2)  # unweighted round


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
    # The data modulus must hold the worst-case sum at the chosen scale.
    with pytest.raises(ConfigurationError, match="scale_bits"):
        CKKSParams(clip=1.0, max_clients=100, max_weight=10**4, weighted=True)
    assert CKKSParams(clip=1.0, max_clients=10).security_bits == 192


def test_secret_context_distribution() -> None:
    params = CKKSParams(clip=1.0, max_clients=4)
    dealer_id, member_id, session = 7, 11, os.urandom(32)
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
    secret = open_secret_context(sealed, member_x, member_id, dealer_ann, roster, params)
    assert secret.context.is_private() and secret.fingerprint == keys.fingerprint

    # The member's key opens what the dealer's clients encrypt: same federation key.
    round_session = os.urandom(32)
    server = HEAggregator(
        PublicContext.from_bytes(keys.public.to_bytes(), params, dealer_ann.fingerprint),
        round_session,
        10,
    )
    server.add(dealer_id, HEClient(keys.secret, round_session, 10).encrypt_update(np.ones(10)))
    server.add(member_id, HEClient(secret, round_session, 10).encrypt_update(np.ones(10)))
    total = HEClient(secret, round_session, 10).decrypt_sum(server.aggregate()).total
    np.testing.assert_allclose(total, 2.0, atol=1e-6)

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

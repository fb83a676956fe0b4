"""Pinned known-answer vectors (``vectors/known_answers.json``) for everything two parties must
compute identically: key agreement and derivation, self-mask keys and commitments, the signed
and hashed encodings, the SecAgg+ seed and graph, Shamir reconstruction and every message's
canonical bytes. A change to any of them breaks interoperability between versions (and every
recorded transcript digest), so it must be deliberate: regenerate the file in the same commit
and say why. The X25519 vector is RFC 7748 section 6.1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secagg import shamir
from secagg.graph import harary_graph
from secagg.keys import AgreementKeyPair, derive_pair_key
from secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    Message,
    PeerAdvert,
    SeedCommit,
    SeedCommitments,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    encode_message,
)
from secagg.protocol.common import (
    RoundParams,
    advert_signed_bytes,
    commitments_digest,
    consistency_signed_bytes,
    context_digest,
    graph_seed,
    seed_commitment,
    self_mask_commitment,
    self_mask_key,
    session_digest,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "known_answers.json").read_text()
)
SID = bytes([0x22]) * 32


def _b(text: str) -> bytes:
    return bytes.fromhex(text)


def test_x25519_rfc7748() -> None:
    v = VECTORS["x25519"]
    assert v["shared"] == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    pair = AgreementKeyPair.from_private_bytes(_b(v["private"]))
    assert pair.exchange(_b(v["peer_public"])).hex() == v["shared"]


@pytest.mark.parametrize("v", VECTORS["pair_keys"], ids=lambda v: v["purpose"])
def test_pair_key_derivation(v: dict[str, Any]) -> None:
    key = derive_pair_key(
        _b(v["shared"]), _b(v["session"]), v["purpose"].encode(), v["u"], v["v"], v["length"]
    )
    assert key.hex() == v["key"]


def test_self_mask_key_and_commitment() -> None:
    v = VECTORS["self_mask"]
    assert self_mask_key(SID, v["u"], _b(v["seed"])).hex() == v["key"]
    assert self_mask_commitment(SID, v["u"], _b(v["seed"])).hex() == v["commitment"]


def test_round_parameters_and_context_digest() -> None:
    v = VECTORS["round"]
    params = RoundParams(
        SID,
        v["ring_bits"],
        v["dim"],
        v["threshold"],
        tuple(v["cohort"]),
        quorum=v["quorum"],
        min_survivors=v["min_survivors"],
    )
    assert params.canonical_bytes().hex() == v["canonical_bytes"]
    assert context_digest(params, _b(v["context"])).hex() == v["context_digest"]


def test_graph_seed_commitments_and_graph() -> None:
    v = VECTORS["graph_seed"]
    reveals = tuple((u, _b(r)) for u, r in v["reveals"])
    commitments = tuple((u, seed_commitment(SID, u, r)) for u, r in reveals)
    assert [[u, c.hex()] for u, c in commitments] == v["commitments"]
    assert commitments_digest(SID, commitments).hex() == v["commitments_digest"]
    assert graph_seed(SID, reveals).hex() == v["seed"]
    digest = session_digest(bytes([7]) * 32, commitments_digest(SID, commitments))
    assert digest.hex() == v["session_digest"]
    h = VECTORS["harary"]
    graph = harary_graph(tuple(h["ids"]), h["k"], _b(h["seed"]))
    assert list(graph.ring) == h["ring"]
    assert list(graph.neighbours(1)) == h["neighbours_of_1"]


def test_signed_bytes() -> None:
    v = VECTORS["signed_bytes"]
    advert = advert_signed_bytes(
        SID, 3, bytes([0xA]) * 32, bytes([0xB]) * 32, bytes([0xC]) * 32, bytes([0xD]) * 32
    )
    assert advert.hex() == v["advert"]
    assert consistency_signed_bytes(SID, bytes([0xC]) * 32, (1, 3, 4)).hex() == v["consistency"]


def test_shamir_reconstruction_from_pinned_shares() -> None:
    v = VECTORS["shamir"]
    shares = {int(x): _b(s) for x, s in v["shares"].items()}
    for subset in ((1, 2, 3), (1, 3, 5), (2, 4, 5), (1, 2, 3, 4, 5)):
        chosen = {x: shares[x] for x in subset}
        assert shamir.reconstruct(chosen, v["threshold"]).hex() == v["secret"]


def _p(n: int) -> bytes:
    return bytes([n]) * 32


MESSAGES: list[Message] = [
    SeedCommit(SID, 3, _p(1)),
    AdvertiseKeys(SID, 3, _p(2), _p(3), _p(4), bytes([5]) * 64, _p(6)),
    ShareKeys(SID, 3, _p(7), ((1, b"ct-1"), (4, b"ct-4"))),
    MaskedInput(SID, 3, bytes(range(40))),
    ConsistencySignature(SID, 3, bytes([8]) * 64),
    UnmaskResponse(SID, 3, ((1, bytes([9]) * 33),), ((4, bytes([10]) * 33),)),
    SeedCommitments(SID, 3, ((1, _p(11)), (3, _p(12)))),
    KeysBroadcast(
        SID,
        3,
        (PeerAdvert(1, _p(13), _p(14), _p(15), bytes([16]) * 64),),
        ((1, _p(17)), (3, _p(18))),
    ),
    SharesDelivery(SID, 3, ((1, b"ct-1"),)),
    ConsistencyRequest(SID, 3, (1, 3, 4)),
    UnmaskRequest(SID, 3, (1, 3), ((1, bytes([19]) * 64),), (1, 3), (4,)),
]


@pytest.mark.parametrize(
    ("message", "pinned"),
    list(zip(MESSAGES, VECTORS["messages"], strict=True)),
    ids=lambda x: type(x).__name__ if not isinstance(x, dict) else "",
)
def test_message_encodings(message: Message, pinned: dict[str, str]) -> None:
    assert type(message).__name__ == pinned["type"]
    assert encode_message(message).hex() == pinned["encoding"]
    assert decode_message(_b(pinned["encoding"])) == message

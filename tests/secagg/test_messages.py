import dataclasses
import os

import pytest

from secagg.errors import MessageFormatError
from secagg.messages import (
    VERSION,
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

SID = os.urandom(32)
ADVERT = PeerAdvert(7, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64))
SAMPLES: list[Message] = [
    AdvertiseKeys(SID, 3, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64)),
    AdvertiseKeys(
        SID, 3, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64), os.urandom(32)
    ),
    SeedCommit(SID, 3, os.urandom(32)),
    SeedCommitments(SID, 3, ((1, os.urandom(32)), (3, os.urandom(32)))),
    KeysBroadcast(SID, 3, (ADVERT,), ((1, os.urandom(32)), (7, os.urandom(32)))),
    ShareKeys(SID, 3, os.urandom(32), ((1, b"ct1"), (9, b"ct9"))),
    MaskedInput(SID, 3, os.urandom(1000)),
    ConsistencySignature(SID, 3, os.urandom(64)),
    UnmaskResponse(SID, 3, ((1, os.urandom(33)),), ((2, os.urandom(33)), (4, os.urandom(33)))),
    KeysBroadcast(SID, 3, (ADVERT,)),
    SharesDelivery(SID, 3, ((1, b"x" * 94),)),
    ConsistencyRequest(SID, 3, (1, 2, 3)),
    UnmaskRequest(SID, 3, (1, 3), ((1, os.urandom(64)),), (1, 3), (2,)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip_is_exact_and_canonical(msg: Message) -> None:
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert encode_message(decode_message(data)) == data


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_and_extension_is_refused(msg: Message) -> None:
    data = encode_message(msg)
    for cut in range(0, len(data), max(1, len(data) // 40)):
        with pytest.raises(MessageFormatError):
            decode_message(data[:cut])
    with pytest.raises(MessageFormatError, match="trailing"):
        decode_message(data + b"\x00")


def test_header_checks() -> None:
    data = bytearray(encode_message(SAMPLES[0]))
    with pytest.raises(MessageFormatError, match="magic"):
        decode_message(b"XXX" + bytes(data[3:]))
    data[3] = 99
    with pytest.raises(MessageFormatError, match="version"):
        decode_message(bytes(data))
    data[3], data[4] = VERSION, 77
    with pytest.raises(MessageFormatError, match="unknown message type"):
        decode_message(bytes(data))


def test_huge_declared_count_refused_before_allocation() -> None:
    data = bytearray(encode_message(ConsistencyRequest(SID, 3, (1, 2))))
    data[-12:-8] = (2**31).to_bytes(4, "big")  # the count field
    with pytest.raises(MessageFormatError, match="too short"):
        decode_message(bytes(data))


def test_non_canonical_lists_refused() -> None:
    with pytest.raises(MessageFormatError, match="increasing"):
        encode_message(ConsistencyRequest(SID, 3, (2, 1)))
    with pytest.raises(MessageFormatError, match="increasing"):
        encode_message(ShareKeys(SID, 3, bytes(32), ((1, b"a"), (1, b"b"))))
    with pytest.raises(MessageFormatError, match="32 bytes"):
        encode_message(AdvertiseKeys(SID, 3, b"short", bytes(32), bytes(32), bytes(64)))


def test_a_seed_reveal_of_the_wrong_size_is_refused() -> None:
    advert = AdvertiseKeys(SID, 3, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64))
    with pytest.raises(MessageFormatError, match="seed reveal"):
        encode_message(dataclasses.replace(advert, seed_reveal=b"short"))
    good = encode_message(dataclasses.replace(advert, seed_reveal=bytes(32)))
    # Rewrite the reveal's length field (the last 36 bytes are length + reveal) to 31 + 1 spare.
    bad = good[:-36] + (31).to_bytes(4, "big") + good[-32:-1]
    with pytest.raises(MessageFormatError):
        decode_message(bad)

import os

import pytest

from secagg import aead
from secagg.errors import (
    ConfigurationError,
    DecryptionError,
    InvalidSignatureError,
    UnknownClient,
)
from secagg.keys import AgreementKeyPair, Identity, KeyPurpose, Roster, derive_pair_key


def test_pair_key_agrees_and_is_bound_to_session_pair_and_purpose() -> None:
    a, b = AgreementKeyPair.generate(), AgreementKeyPair.generate()
    sid = os.urandom(32)
    ka = derive_pair_key(a.exchange(b.public_bytes), sid, KeyPurpose.MASK, 3, 7, 16)
    kb = derive_pair_key(b.exchange(a.public_bytes), sid, KeyPurpose.MASK, 7, 3, 16)
    assert ka == kb
    secret = a.exchange(b.public_bytes)
    others = {
        derive_pair_key(secret, os.urandom(32), KeyPurpose.MASK, 3, 7, 16),
        derive_pair_key(secret, sid, KeyPurpose.SHARE_ENCRYPTION, 3, 7, 16),
        derive_pair_key(secret, sid, KeyPurpose.MASK, 3, 8, 16),
    }
    assert ka not in others and len(others) == 3


def test_aead_rejects_tampering_replay_and_misrouting() -> None:
    key, sid = os.urandom(32), os.urandom(32)
    ct = aead.seal(key, b"share bytes", sid, 1, 2)
    assert aead.open_sealed(key, ct, sid, 1, 2) == b"share bytes"
    tampered = bytearray(ct)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        aead.open_sealed(key, bytes(tampered), sid, 1, 2)
    with pytest.raises(DecryptionError):
        aead.open_sealed(key, ct, os.urandom(32), 1, 2)  # replay into another session
    with pytest.raises(DecryptionError):
        aead.open_sealed(key, ct, sid, 1, 3)  # routed to the wrong recipient
    with pytest.raises(DecryptionError):
        aead.open_sealed(key, ct, sid, 2, 1)  # claimed by the wrong sender
    with pytest.raises(DecryptionError):
        aead.open_sealed(key, ct[:10], sid, 1, 2)


def test_roster_verifies_signatures_and_rejects_unknown_ids() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    roster = Roster({1: alice.public_bytes})
    roster.verify(1, alice.sign(b"msg"), b"msg", "test")
    with pytest.raises(InvalidSignatureError):
        roster.verify(1, mallory.sign(b"msg"), b"msg", "test")
    with pytest.raises(InvalidSignatureError):
        roster.verify(1, b"", b"msg", "test")
    with pytest.raises(UnknownClient):
        roster.verify(2, alice.sign(b"msg"), b"msg", "test")
    with pytest.raises(ConfigurationError):
        Roster({0: alice.public_bytes})
    with pytest.raises(ConfigurationError):
        Roster({1: alice.public_bytes, 2: alice.public_bytes})
    assert Identity.from_private_bytes(alice.private_bytes()).public_bytes == alice.public_bytes


def test_roster_membership_and_unknown_signer() -> None:
    import pytest

    from secagg.errors import UnknownClient
    from secagg.keys import Identity, Roster

    identity = Identity.generate()
    roster = Roster({5: identity.public_bytes})
    assert 5 in roster and 6 not in roster
    with pytest.raises(UnknownClient):
        roster.verify(6, identity.sign(b"m"), b"m", "test message")
    roster.verify(5, identity.sign(b"m"), b"m", "test message")

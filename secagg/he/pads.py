"""Integrity pads: the pseudorandom value every contributor adds to every slot it encrypts.

Contributor ``u`` of a session derives ``K_u = HKDF-SHA256(tag_key, salt = session_id, info =
PAD_DOMAIN | u (4 bytes) | view)`` (16 bytes), where ``view`` is the SHA-256 digest of the
round as ``u`` saw it (:func:`secagg.he.session.view_digest`). The AES-128-CTR keystream of
``K_u`` from block 0, read as little-endian 64-bit words, gives one word per slot in
(chunk, slot) order; its top :data:`~secagg.he.params.PAD_BITS` bits minus 2^(PAD_BITS-1) are
the integer ``k`` and the pad is ``k * params.pad_step``: uniform on a grid of 2^PAD_BITS points in
[-R, R). A pad is thus bound to the tag key, the session, the contributor, its view of the round,
the ciphertext index and the slot; the server, which never holds the tag key, cannot predict one.

Pads stay integers until the end so the decryptor's sum over the claimed contributors is exact.
The sum is accumulated in place, one keystream buffer reused for every contributor: the
decryptor's cost is one AES-CTR pass and two vector operations per contributor and slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.he.params import PAD_BITS, CKKSParams
from secagg.ids import check_session_id, id_bytes

PAD_DOMAIN = b"fedsec/secagg/he/v1/pads"
_KEY_BYTES = 16
_SHIFT = np.uint64(64 - PAD_BITS)
_OFFSET = np.int64(2 ** (PAD_BITS - 1))

IntArray = npt.NDArray[np.int64]


def pad_key(tag_key: bytes, session_id: bytes, client_id: int, view: bytes) -> bytes:
    """``K_u`` of the module docstring."""
    hkdf = HKDF(
        hashes.SHA256(),
        _KEY_BYTES,
        salt=check_session_id(session_id),
        info=PAD_DOMAIN + id_bytes(client_id) + view,
    )
    return hkdf.derive(tag_key)


def pad_sum(keys: Sequence[bytes], params: CKKSParams, chunks: int) -> IntArray:
    """The (chunks, slots) integers ``k`` of the pads of ``keys``, summed (exact in int64 for
    up to :data:`~secagg.he.params.MAX_PADDED_CLIENTS` keys)."""
    count = chunks * params.slots
    acc = np.zeros(count, dtype=np.uint64)
    zeros = bytes(8 * count)
    # update_into may need up to one block more room than it writes.
    buffer = bytearray(8 * count + 15)
    words = np.frombuffer(buffer, dtype="<u8", count=count)
    for key in keys:
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(zeros, buffer)
        np.right_shift(words, _SHIFT, out=words)
        np.add(acc, words, out=acc)
    total = acc.view(np.int64)
    total -= np.int64(len(keys)) * _OFFSET
    return total.reshape(chunks, params.slots)


def pad_values(integers: IntArray, params: CKKSParams) -> npt.NDArray[np.float64]:
    """Pads (or a sum of pads) as float64: ``k * pad_step``, exact for a single pad."""
    return integers.astype(np.float64) * params.pad_step

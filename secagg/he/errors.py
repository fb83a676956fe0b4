"""Refusals specific to the homomorphic-encryption backend.

They extend :mod:`secagg.errors`, so a caller that catches :class:`secagg.errors.SecAggError`
catches these too. A bad ciphertext is not a protocol abort: the aggregator discards it and goes
on with the others, exactly as the masking server discards a bad masked input. A forged aggregate
is: the decryptor's session ends and releases nothing.
"""

from __future__ import annotations

from secagg.errors import MessageFormatError, ProtocolAbort, SecAggError


class CiphertextFormatError(MessageFormatError):
    """Bytes that are not a well-formed encrypted update or aggregate for this round (garbled,
    truncated, wrong dimension or chunk count, or not a CKKS ciphertext of these parameters)."""


class ContextMismatch(SecAggError):
    """A ciphertext, public context or secret context whose fingerprint is not the federation's:
    it was made under other keys and would decrypt to garbage if it were added."""


class AggregateIntegrityError(ProtocolAbort):
    """A decrypted aggregate that is not the sum it claims to be: its integrity pads do not
    cancel (it is not the sum of the fresh uploads of exactly the claimed contributors of this
    session, made from the decryptor's own view of the round), a slot is outside the range an
    honest sum can reach, or the summed weight is not a plausible integer. Nothing is released."""


class NoDecryptor(ProtocolAbort):
    """The round's decryptor did not contribute, or did not release the sum before its deadline;
    the attempt ends with nothing released (a later attempt runs under a fresh session)."""

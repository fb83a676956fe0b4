"""Refusals specific to the homomorphic-encryption backend.

They extend :mod:`secagg.errors`, so a caller that catches :class:`secagg.errors.SecAggError`
catches these too. A bad ciphertext is not a protocol abort: the aggregator discards it and goes
on with the others, exactly as the masking server discards a bad masked input.
"""

from __future__ import annotations

from secagg.errors import MessageFormatError, SecAggError


class CiphertextFormatError(MessageFormatError):
    """Bytes that are not a well-formed encrypted update or aggregate for this round (garbled,
    truncated, wrong dimension or chunk count, or not a CKKS ciphertext of these parameters)."""


class ContextMismatch(SecAggError):
    """A ciphertext, public context or secret context whose fingerprint is not the federation's:
    it was made under other keys and would decrypt to garbage if it were added."""


class AggregateIntegrityError(SecAggError):
    """A decrypted aggregate that cannot be the sum it claims to be (for example a summed weight
    that is not an integer, or smaller than the number of contributors)."""

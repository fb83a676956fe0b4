"""Every refusal in secure aggregation has its own exception type.

A caller (the gRPC server, the client SDK, a test) can tell *why* a round stopped from the type
alone; the message says what to do about it. All of them derive from :class:`SecAggError`.
Protocol violations that end a session derive from :class:`ProtocolAbort`: after one is raised
the session object refuses all further input and releases nothing.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by :mod:`secagg`."""


# --- configuration and encoding -------------------------------------------------------------


class ConfigurationError(SecAggError, ValueError):
    """Parameters that cannot work (for example a ring too small for the cohort's sum)."""


class PolicyViolation(SecAggError):
    """Round parameters below what this client's policy accepts (threshold, cohort, ring bits)."""


class EncodingError(SecAggError, ValueError):
    """Input that cannot be encoded: NaN/Inf, wrong dtype or shape, values outside the range."""


class MessageFormatError(SecAggError, ValueError):
    """Bytes that do not decode to a well-formed message of the expected version and type."""


# --- protocol aborts -------------------------------------------------------------------------


class ProtocolAbort(SecAggError):
    """The session is over; nothing more will be released by this party."""


class SessionMismatch(ProtocolAbort):
    """A message for another session (a replay from an earlier round, or a misrouted one)."""


class UnexpectedMessage(ProtocolAbort):
    """A message that does not belong to the current stage, or from a party not in it."""


class DuplicateClient(ProtocolAbort):
    """Two messages claim the same client id in one stage."""


class UnknownClient(ProtocolAbort):
    """A client id that is not in the roster or not in this session's cohort."""


class InvalidSignatureError(ProtocolAbort):
    """A signature that does not verify against the roster's identity key, or is missing."""


class DecryptionError(ProtocolAbort):
    """An encrypted share that fails authentication (tampered, misrouted or replayed)."""


class InconsistentSharesError(ProtocolAbort):
    """Shamir shares that do not lie on one polynomial, or reconstruct a secret that does not
    match its commitment: at least one share is corrupt."""


class ShareRequestRefused(ProtocolAbort):
    """The server asked for shares that would unmask an individual input (for example both the
    self-mask share and the key share of the same client, or shares outside the checked set)."""


class ConsistencyError(ProtocolAbort):
    """Parties did not see the same survivor set, global model or round configuration."""


class TooFewSurvivors(ProtocolAbort):
    """Fewer parties than the threshold remain; the round ends without releasing a sum."""


class SurvivorSetRefused(ConsistencyError):
    """A survivor set the client will not sign: it omits the client itself, or names a neighbour
    whose shares never reached it (so the client did not mask with it), or leaves the client
    fewer surviving neighbours than the threshold. Signing it would let the server unmask the
    client's input alone (the isolation attack)."""


class GraphSeedError(ProtocolAbort):
    """The SecAgg+ graph seed cannot be fixed honestly: a committed client did not reveal, a
    reveal does not match its commitment, or the client's own commitment is missing."""


class InvalidPublicKey(ProtocolAbort):
    """A key-agreement public key that is malformed or of low order (its shared secret would be
    all zeros, so nothing derived from it is secret)."""


class SessionFailure(ProtocolAbort):
    """An unexpected failure inside a session (a library error while processing a message); the
    session is aborted and wiped exactly as for any other violation."""


class SumBackendFailure(ProtocolAbort):
    """The server's sum backend could not complete an addition or the mask removal (for example
    a worker process of a parallel backend died). The session aborts and releases nothing; the
    round is rerun."""

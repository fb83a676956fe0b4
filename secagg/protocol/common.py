"""What the client and server of a secure-aggregation session agree on.

``RoundParams`` are public and fixed per session; ``ClientPolicy`` is each institution's floor
below which it refuses to take part. The byte strings that get signed and hashed are built here
once, with a domain-separation label each and every variable-length field length-prefixed, so
the two ends cannot drift apart and no two different inputs share an encoding.

SecAgg+ graph seed: the server must not choose (or grind) the neighbour graph, so the seed is
fixed by the clients. Each client commits to 32 random bytes (:func:`seed_commitment`) before
anyone reveals; the server returns the list of commitments; each client reveals inside its
signed key advert, and the seed is the hash of *every* committed client's reveal
(:func:`graph_seed`). A missing reveal aborts the session (the server cannot pick which reveals
count), a client checks its own commitment is in the list before revealing, and the list's
digest is folded into the session digest every advert and survivor-set signature covers, so
clients shown different lists never agree on anything.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import ConfigurationError, DuplicateClient, PolicyViolation
from secagg.graph import NeighbourGraph, complete_graph, harary_degree, harary_graph
from secagg.ids import check_client_id, check_session_id, id_bytes
from secagg.params import (
    DEFAULT_CORRUPT_FRACTION,
    DEFAULT_SECURITY_BITS,
    active_quorum,
    active_server_floor,
)
from secagg.ring import Ring

_PARAMS_DOMAIN = b"fedsec/secagg/v3/round-params"
_CONTEXT_DOMAIN = b"fedsec/secagg/v3/context"
_SESSION_DIGEST_DOMAIN = b"fedsec/secagg/v3/session-digest"
_ADVERT_DOMAIN = b"fedsec/secagg/v3/advertise-keys"
_CONSISTENCY_DOMAIN = b"fedsec/secagg/v3/consistency"
_COMMIT_DOMAIN = b"fedsec/secagg/v1/self-mask-commitment"
_SELF_MASK_DOMAIN = b"fedsec/secagg/v1/self-mask-key"
_SEED_COMMIT_DOMAIN = b"fedsec/secagg/v1/graph-seed-commitment"
_SEED_LIST_DOMAIN = b"fedsec/secagg/v1/graph-seed-commitment-list"
_SEED_DOMAIN = b"fedsec/secagg/v1/graph-seed"

#: Bytes of a client's contribution to the SecAgg+ graph seed.
SEED_REVEAL_BYTES = 32


class Stage(Enum):
    """The stages of DESIGN.md (SecAgg+ adds the graph-seed commitment first), plus the two
    terminal states."""

    SEED_COMMIT = "seed_commit"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


#: Every stage a session can have, in order; :attr:`RoundParams.stages` are the ones it has.
PROTOCOL_STAGES = (
    Stage.SEED_COMMIT,
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)


def _lp(data: bytes) -> bytes:
    """Length-prefixed field: 8-byte big-endian length, then the bytes."""
    return struct.pack(">Q", len(data)) + data


def _ids(values: Iterable[int]) -> bytes:
    body = b"".join(id_bytes(u) for u in values)
    return _lp(body)


@dataclass(frozen=True)
class RoundParams:
    """Public parameters of one aggregation session (identical at every party).

    ``neighbours``: None for the complete graph (classic SecAgg), else the SecAgg+ Harary degree
    k; the graph's labels then come from a seed the clients fix during the session.
    ``quorum``: how many cohort members must sign the same survivor set before anyone reveals a
    share (0: the default, :func:`~secagg.params.active_quorum` at the default corrupt fraction
    and at least t). Clients demand floor((n + c)/2) + 1 for their own assumed c, which makes
    the survivor set unique.
    ``min_survivors``: a floor on the contributors of the released sum beyond t and the quorum
    (0: none). Distributed DP needs it: the noise is sized for at least that many contributors.
    Server and clients both refuse to go on below :attr:`min_release`.
    """

    session_id: bytes
    ring_bits: int
    dim: int
    threshold: int
    cohort: tuple[int, ...]
    neighbours: int | None = None
    quorum: int = 0
    min_survivors: int = 0
    _degree: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        Ring(self.ring_bits)
        if self.dim < 1:
            raise ConfigurationError(f"vector length must be at least 1, got {self.dim}")
        for u in self.cohort:
            check_client_id(u)
        if len(set(self.cohort)) != len(self.cohort):
            raise DuplicateClient("the cohort lists a client id more than once")
        if list(self.cohort) != sorted(self.cohort):
            raise ConfigurationError("the cohort must be sorted by client id")
        n = len(self.cohort)
        if n < 2:
            raise ConfigurationError("secure aggregation needs at least 2 clients")
        if self.neighbours is not None and (
            not isinstance(self.neighbours, int) or self.neighbours < 1
        ):
            raise ConfigurationError(f"neighbours must be None or >= 1, got {self.neighbours!r}")
        degree = n - 1 if self.is_complete else harary_degree(n, self.neighbours or 0)
        object.__setattr__(self, "_degree", degree)
        if not 2 <= self.threshold <= degree + 1:
            raise ConfigurationError(
                f"threshold {self.threshold} must be in [2, {degree + 1}] "
                "(shares go to a client's neighbours and itself; 1 would hand out secrets)"
            )
        if self.quorum != 0 and not self.threshold <= self.quorum <= n:
            raise ConfigurationError(
                f"quorum {self.quorum} must be 0 (default) or in [threshold {self.threshold}, "
                f"cohort size {n}]"
            )
        if self.min_survivors != 0 and not (self.threshold <= self.min_survivors <= n):
            raise ConfigurationError(
                f"min_survivors {self.min_survivors} must be 0 (no floor) or in "
                f"[threshold {self.threshold}, cohort size {n}]"
            )

    @property
    def is_complete(self) -> bool:
        """Classic SecAgg: every client masks with every other; no graph seed is needed."""
        return self.neighbours is None or self.neighbours >= len(self.cohort) - 1

    @property
    def degree(self) -> int:
        """Neighbours per client (n - 1 for the complete graph)."""
        return self._degree

    @property
    def signature_quorum(self) -> int:
        """Signatures on one survivor set a client needs before it reveals any share."""
        return self.quorum or max(self.threshold, active_quorum(len(self.cohort)))

    @property
    def min_release(self) -> int:
        """The fewest contributors a released sum may have (the quorum signs from among them)."""
        return max(self.threshold, self.signature_quorum, self.min_survivors)

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The session's stages: SecAgg+ starts with the graph-seed commitment."""
        return PROTOCOL_STAGES if not self.is_complete else PROTOCOL_STAGES[1:]

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    def graph(self, seed: bytes | None) -> NeighbourGraph:
        """The neighbour graph; SecAgg+ needs the seed fixed during the session."""
        if self.is_complete:
            return complete_graph(self.cohort)
        if seed is None:
            raise ConfigurationError("a SecAgg+ graph needs the session's graph seed")
        return harary_graph(self.cohort, self.neighbours or 0, seed)

    def canonical_bytes(self) -> bytes:
        """What every party binds (inside :func:`context_digest`); every field fixed-width or
        length-prefixed."""
        k = 0 if self.is_complete else (self.neighbours or 0)
        head = struct.pack(
            ">IQIIII",
            self.ring_bits,
            self.dim,
            self.threshold,
            k,
            self.signature_quorum,
            self.min_survivors,
        )
        return _PARAMS_DOMAIN + _lp(self.session_id) + head + _ids(self.cohort)


@dataclass(frozen=True)
class ClientPolicy:
    """An institution's minimums; a round below any of them is refused with the reason.

    The threshold, degree and quorum floors are not numbers the server can talk a client down
    from: the client derives them itself (:func:`secagg.params.active_server_floor`) from the
    cohort size and its own ``corrupt_fraction`` (how many cohort members it assumes may collude
    with the server) and ``dropout_fraction`` (what SecAgg+'s degree is sized for).
    ``min_threshold`` is an absolute floor on top (for example "no sum of fewer than 10").
    """

    min_threshold: int = 2
    min_cohort: int = 3
    min_ring_bits: int = 16
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION
    dropout_fraction: float = 0.05
    security_bits: int = DEFAULT_SECURITY_BITS

    def __post_init__(self) -> None:
        for name in ("corrupt_fraction", "dropout_fraction"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ConfigurationError(f"policy {name} must be in [0, 1), got {value!r}")
        for name in ("min_threshold", "min_cohort", "min_ring_bits", "security_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"policy {name} must be a positive integer, got {value!r}")

    def check(self, params: RoundParams) -> None:
        n = len(params.cohort)
        problems = []
        if params.threshold < self.min_threshold:
            problems.append(f"threshold {params.threshold} < policy minimum {self.min_threshold}")
        if n < self.min_cohort:
            problems.append(f"cohort of {n} < policy minimum {self.min_cohort}")
        if params.ring_bits < self.min_ring_bits:
            problems.append(
                f"ring of {params.ring_bits} bits < policy minimum {self.min_ring_bits}"
            )
        if not problems:
            problems = self._active_server_problems(params)
        if problems:
            raise PolicyViolation("round parameters refused: " + "; ".join(problems))

    def _active_server_problems(self, params: RoundParams) -> list[str]:
        n = len(params.cohort)
        floor = active_server_floor(
            n, params.degree, self.corrupt_fraction, self.dropout_fraction, self.security_bits
        )
        assumed = f"assuming up to {floor.corrupt} of {n} clients collude with the server"
        problems = []
        if params.degree < floor.min_degree:
            graph = "the complete graph" if floor.min_degree == n - 1 else f"{floor.min_degree}"
            problems.append(
                f"neighbourhood degree {params.degree} < {graph} ({assumed}, "
                f"{self.dropout_fraction:.0%} dropouts, 2^-{self.security_bits})"
            )
        if params.threshold < floor.min_threshold:
            problems.append(
                f"threshold {params.threshold} < {floor.min_threshold}, the smallest an active "
                f"server cannot split at degree {params.degree} ({assumed})"
            )
        if params.signature_quorum < floor.quorum:
            problems.append(
                f"survivor-set quorum {params.signature_quorum} < {floor.quorum} ({assumed}; a "
                "smaller quorum lets the server show different survivor sets to different clients)"
            )
        return problems


def context_digest(params: RoundParams, context: bytes) -> bytes:
    """The round parameters and the global model/config a client was given; survivors must all
    hold the same value (model-inconsistency defence). Both fields are length-prefixed."""
    return hashlib.sha256(_CONTEXT_DOMAIN + _lp(params.canonical_bytes()) + _lp(context)).digest()


def seed_commitment(session_id: bytes, u: int, reveal: bytes) -> bytes:
    """u's commitment to its share of the SecAgg+ graph seed."""
    return hashlib.sha256(
        _SEED_COMMIT_DOMAIN + _lp(session_id) + id_bytes(u) + _lp(reveal)
    ).digest()


def commitments_digest(session_id: bytes, commitments: tuple[tuple[int, bytes], ...]) -> bytes:
    """The digest of the list of graph-seed commitments a client was shown."""
    body = b"".join(id_bytes(v) + _lp(c) for v, c in commitments)
    return hashlib.sha256(
        _SEED_LIST_DOMAIN + _lp(session_id) + struct.pack(">I", len(commitments)) + body
    ).digest()


def graph_seed(session_id: bytes, reveals: tuple[tuple[int, bytes], ...]) -> bytes:
    """The SecAgg+ graph seed: a hash of every committed client's reveal, in id order."""
    body = b"".join(id_bytes(v) + _lp(r) for v, r in reveals)
    return hashlib.sha256(
        _SEED_DOMAIN + _lp(session_id) + struct.pack(">I", len(reveals)) + body
    ).digest()


def session_digest(context: bytes, seed_commitments: bytes) -> bytes:
    """A SecAgg+ session's digest: the context digest and the commitment list it was shown."""
    return hashlib.sha256(_SESSION_DIGEST_DOMAIN + _lp(context) + _lp(seed_commitments)).digest()


def advert_signed_bytes(
    session_id: bytes, u: int, enc_pk: bytes, mask_pk: bytes, digest: bytes, seed_reveal: bytes
) -> bytes:
    return (
        _ADVERT_DOMAIN
        + _lp(session_id)
        + id_bytes(u)
        + _lp(enc_pk)
        + _lp(mask_pk)
        + _lp(digest)
        + _lp(seed_reveal)
    )


def consistency_signed_bytes(session_id: bytes, digest: bytes, survivors: tuple[int, ...]) -> bytes:
    return _CONSISTENCY_DOMAIN + _lp(session_id) + _lp(digest) + _ids(survivors)


def self_mask_commitment(session_id: bytes, u: int, seed: bytes) -> bytes:
    return hashlib.sha256(_COMMIT_DOMAIN + session_id + id_bytes(u) + seed).digest()


def self_mask_key(session_id: bytes, u: int, seed: bytes) -> bytes:
    """The AES-128 key of u's self mask, bound to the session and to u."""
    hkdf = HKDF(hashes.SHA256(), 16, salt=session_id, info=_SELF_MASK_DOMAIN + id_bytes(u))
    return hkdf.derive(seed)

"""What the client and server of a secure-aggregation session agree on.

``RoundParams`` are public and fixed per session; ``ClientPolicy`` is each institution's floor
below which it refuses to take part. The byte strings that get signed and hashed are built here
once, with a domain-separation label each, so the two ends cannot drift apart.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import Enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import ConfigurationError, DuplicateClient, PolicyViolation
from secagg.graph import NeighbourGraph, complete_graph, harary_graph
from secagg.ids import check_client_id, check_session_id, id_bytes
from secagg.ring import Ring

_PARAMS_DOMAIN = b"fedsec/secagg/v1/round-params"
# Parameters with a survivor floor are encoded under a label of the same length that differs
# from v1's, so no v1 encoding equals a v2 one; v1 stays as it was for rounds without a floor.
_PARAMS_FLOOR_DOMAIN = b"fedsec/secagg/v2/round-params"
_CONTEXT_DOMAIN = b"fedsec/secagg/v1/context"
_ADVERT_DOMAIN = b"fedsec/secagg/v1/advertise-keys"
_CONSISTENCY_DOMAIN = b"fedsec/secagg/v1/consistency"
_COMMIT_DOMAIN = b"fedsec/secagg/v1/self-mask-commitment"
_SELF_MASK_DOMAIN = b"fedsec/secagg/v1/self-mask-key"


class Stage(Enum):
    """The five stages of DESIGN.md, plus the two terminal states."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


PROTOCOL_STAGES = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)


@dataclass(frozen=True)
class RoundParams:
    """Public parameters of one aggregation session (identical at every party).

    ``min_survivors`` is a floor on the contributors of the released sum beyond the Shamir
    threshold (0: none). Distributed DP needs it: the clients' noise is sized for a sum of at
    least that many contributors, and under SecAgg+ the per-neighbourhood threshold is far
    smaller. Server and clients both refuse to go on below :attr:`min_release`.
    """

    session_id: bytes
    ring_bits: int
    dim: int
    threshold: int
    cohort: tuple[int, ...]
    neighbours: int | None = None  # None: complete graph (classic SecAgg); k: SecAgg+ Harary
    graph_seed: bytes = bytes(32)
    min_survivors: int = 0

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
        if len(self.cohort) < 2:
            raise ConfigurationError("secure aggregation needs at least 2 clients")
        if not 2 <= self.threshold <= self.graph.degree + 1:
            raise ConfigurationError(
                f"threshold {self.threshold} must be in [2, {self.graph.degree + 1}] "
                "(shares go to a client's neighbours and itself; 1 would hand out secrets)"
            )
        if self.min_survivors != 0 and not (
            self.threshold <= self.min_survivors <= len(self.cohort)
        ):
            raise ConfigurationError(
                f"min_survivors {self.min_survivors} must be 0 (no floor) or in "
                f"[threshold {self.threshold}, cohort size {len(self.cohort)}]"
            )

    @property
    def min_release(self) -> int:
        """The fewest contributors a released sum may have."""
        return max(self.threshold, self.min_survivors)

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    @property
    def graph(self) -> NeighbourGraph:
        if self.neighbours is None or self.neighbours >= len(self.cohort) - 1:
            return complete_graph(self.cohort)
        return harary_graph(self.cohort, self.neighbours, self.graph_seed)

    def canonical_bytes(self) -> bytes:
        """What every party binds (inside :func:`context_digest`). Without a survivor floor
        this is the v1 encoding unchanged, so deployments that never set one (the gRPC path)
        and their recorded digests are unaffected; with one, the v2 label and the floor."""
        k = 0 if self.neighbours is None else self.neighbours
        cohort = b"".join(id_bytes(u) for u in self.cohort)
        fields = (self.ring_bits, self.dim, self.threshold, k)
        if self.min_survivors == 0:
            head = struct.pack(">IIII", *fields)
            return _PARAMS_DOMAIN + self.session_id + head + self.graph_seed + cohort
        head = struct.pack(">IIIII", *fields, self.min_survivors)
        return _PARAMS_FLOOR_DOMAIN + self.session_id + head + self.graph_seed + cohort


@dataclass(frozen=True)
class ClientPolicy:
    """An institution's minimums; a round below any of them is refused with the reason."""

    min_threshold: int = 2
    min_cohort: int = 3
    min_ring_bits: int = 16
    min_threshold_fraction: float = 0.0  # t / degree; e.g. 0.5 demands a majority

    def check(self, params: RoundParams) -> None:
        degree = params.graph.degree
        problems = []
        if params.threshold < self.min_threshold:
            problems.append(f"threshold {params.threshold} < policy minimum {self.min_threshold}")
        if len(params.cohort) < self.min_cohort:
            problems.append(f"cohort of {len(params.cohort)} < policy minimum {self.min_cohort}")
        if params.ring_bits < self.min_ring_bits:
            problems.append(
                f"ring of {params.ring_bits} bits < policy minimum {self.min_ring_bits}"
            )
        if params.threshold < self.min_threshold_fraction * degree:
            problems.append(
                f"threshold {params.threshold} is below {self.min_threshold_fraction:.0%} "
                f"of the {degree} neighbours"
            )
        if problems:
            raise PolicyViolation("round parameters refused: " + "; ".join(problems))


def context_digest(params: RoundParams, context: bytes) -> bytes:
    """What a client signs in AdvertiseKeys: the round parameters and the global model/config it
    was given. Survivors must all hold the same value (model-inconsistency defence)."""
    return hashlib.sha256(_CONTEXT_DOMAIN + params.canonical_bytes() + context).digest()


def advert_signed_bytes(
    session_id: bytes, u: int, enc_pk: bytes, mask_pk: bytes, digest: bytes
) -> bytes:
    return _ADVERT_DOMAIN + session_id + id_bytes(u) + enc_pk + mask_pk + digest


def consistency_signed_bytes(session_id: bytes, digest: bytes, survivors: tuple[int, ...]) -> bytes:
    body = b"".join(id_bytes(u) for u in survivors)
    return _CONSISTENCY_DOMAIN + session_id + digest + struct.pack(">I", len(survivors)) + body


def self_mask_commitment(session_id: bytes, u: int, seed: bytes) -> bytes:
    return hashlib.sha256(_COMMIT_DOMAIN + session_id + id_bytes(u) + seed).digest()


def self_mask_key(session_id: bytes, u: int, seed: bytes) -> bytes:
    """The AES-128 key of u's self mask, bound to the session and to u."""
    hkdf = HKDF(hashes.SHA256(), 16, salt=session_id, info=_SELF_MASK_DOMAIN + id_bytes(u))
    return hkdf.derive(seed)

"""The server's record of a secure-aggregation session, for the privacy audit.

It holds what the server received (message type, sender, size, SHA-256 of the canonical bytes),
every share request it sent, every sum it released, the messages it refused and why, and
optionally the masked inputs themselves so that an auditor can test them for uniformity. It
never holds an unmasked individual input: the server never has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MessageRecord:
    stage: str
    kind: str
    session_id: bytes
    sender: int
    recipient: int
    size: int
    digest: bytes


@dataclass(frozen=True)
class ShareRequestRecord:
    session_id: bytes
    recipient: int
    self_mask_for: tuple[int, ...]
    key_for: tuple[int, ...]


@dataclass(frozen=True)
class ReleaseRecord:
    session_id: bytes
    contributors: tuple[int, ...]
    threshold: int  # the floor the server enforced: max(t, min_survivors)


@dataclass(frozen=True)
class RejectionRecord:
    stage: str
    sender: int
    error: str
    reason: str


@dataclass
class Transcript:
    session_id: bytes
    ring_bits: int
    dim: int
    threshold: int
    neighbours: int | None
    cohort: tuple[int, ...]
    messages: list[MessageRecord] = field(default_factory=list)
    share_requests: list[ShareRequestRecord] = field(default_factory=list)
    releases: list[ReleaseRecord] = field(default_factory=list)
    rejections: list[RejectionRecord] = field(default_factory=list)
    masked_inputs: dict[int, bytes] = field(default_factory=dict)
    min_survivors: int = 0  # RoundParams.min_survivors; 0 in transcripts written before it
    quorum: int = 0  # RoundParams.signature_quorum; 0 in transcripts written before it
    # SecAgg+: the graph-seed commitments, the reveals and the seed derived from them.
    seed_commitments: tuple[tuple[int, bytes], ...] = ()
    seed_reveals: tuple[tuple[int, bytes], ...] = ()
    graph_seed: bytes = b""

    @property
    def min_release(self) -> int:
        """The fewest contributors the session's release may have."""
        return max(self.threshold, self.min_survivors, self.quorum)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (bytes as hex)."""
        return {
            "session_id": self.session_id.hex(),
            "ring_bits": self.ring_bits,
            "dim": self.dim,
            "threshold": self.threshold,
            "neighbours": self.neighbours,
            "cohort": list(self.cohort),
            "min_survivors": self.min_survivors,
            "quorum": self.quorum,
            "seed_commitments": [[v, c.hex()] for v, c in self.seed_commitments],
            "seed_reveals": [[v, r.hex()] for v, r in self.seed_reveals],
            "graph_seed": self.graph_seed.hex(),
            "messages": [
                {
                    "stage": m.stage,
                    "kind": m.kind,
                    "session_id": m.session_id.hex(),
                    "sender": m.sender,
                    "recipient": m.recipient,
                    "size": m.size,
                    "digest": m.digest.hex(),
                }
                for m in self.messages
            ],
            "share_requests": [
                {
                    "session_id": r.session_id.hex(),
                    "recipient": r.recipient,
                    "self_mask_for": list(r.self_mask_for),
                    "key_for": list(r.key_for),
                }
                for r in self.share_requests
            ],
            "releases": [
                {
                    "session_id": r.session_id.hex(),
                    "contributors": list(r.contributors),
                    "threshold": r.threshold,
                }
                for r in self.releases
            ],
            "rejections": [
                {"stage": r.stage, "sender": r.sender, "error": r.error, "reason": r.reason}
                for r in self.rejections
            ],
            "masked_inputs": {str(k): v.hex() for k, v in self.masked_inputs.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        return cls(
            session_id=bytes.fromhex(data["session_id"]),
            ring_bits=int(data["ring_bits"]),
            dim=int(data["dim"]),
            threshold=int(data["threshold"]),
            neighbours=None if data["neighbours"] is None else int(data["neighbours"]),
            cohort=tuple(int(x) for x in data["cohort"]),
            min_survivors=int(data.get("min_survivors", 0)),
            quorum=int(data.get("quorum", 0)),
            seed_commitments=tuple(
                (int(v), bytes.fromhex(c)) for v, c in data.get("seed_commitments", [])
            ),
            seed_reveals=tuple((int(v), bytes.fromhex(r)) for v, r in data.get("seed_reveals", [])),
            graph_seed=bytes.fromhex(data.get("graph_seed", "")),
            messages=[
                MessageRecord(
                    m["stage"],
                    m["kind"],
                    bytes.fromhex(m["session_id"]),
                    int(m["sender"]),
                    int(m["recipient"]),
                    int(m["size"]),
                    bytes.fromhex(m["digest"]),
                )
                for m in data["messages"]
            ],
            share_requests=[
                ShareRequestRecord(
                    bytes.fromhex(r["session_id"]),
                    int(r["recipient"]),
                    tuple(int(x) for x in r["self_mask_for"]),
                    tuple(int(x) for x in r["key_for"]),
                )
                for r in data["share_requests"]
            ],
            releases=[
                ReleaseRecord(
                    bytes.fromhex(r["session_id"]),
                    tuple(int(x) for x in r["contributors"]),
                    int(r["threshold"]),
                )
                for r in data["releases"]
            ],
            rejections=[
                RejectionRecord(r["stage"], int(r["sender"]), r["error"], r["reason"])
                for r in data.get("rejections", [])
            ],
            masked_inputs={int(k): bytes.fromhex(v) for k, v in data["masked_inputs"].items()},
        )

"""Audit a server's recorded transcripts for the protocol's privacy rules, from the record alone.

The server records what it received and what it asked for (:mod:`secagg.transcript`). This
module checks, without trusting the server's code, that the record is consistent with the
guarantees of secure aggregation:

* ``share_separation`` -- no client's self-mask share and key share were both requested in one
  session, counted over *all* share requests (a server could list a client as a survivor in
  one request and as dropped in another; the union catches that). Holding both lets the server
  strip every mask from that client's masked input (see :mod:`proofs.toy_enumeration`).
* ``release_threshold`` -- every released sum has at least max(t, min_survivors) distinct
  contributors (the Shamir threshold, or the DP survivor floor when the session set one), all
  in the cohort and all senders of a masked input, and was released under that floor.
* ``session_isolation`` -- every record carries the session id of its transcript, and no two
  transcripts of a run share a session id (a reused id would let messages of one aggregation
  be replayed into another).
* ``record_integrity`` -- each recorded masked input is the payload of a recorded MaskedInput
  message from a cohort member (its re-encoding hashes to the recorded digest), with the size
  the ring and dimension imply.
* ``graph_seed`` -- (SecAgg+) the neighbour graph came from the clients, not the server: every
  client that committed to the graph seed revealed, every reveal opens its commitment, and the
  recorded seed is the hash of all of them (:func:`secagg.protocol.common.graph_seed`).
* ``active_server_parameters`` -- the threshold and the survivor-set quorum hold against an
  active server that colludes with no client (t >= floor(n/2) + 1 on the complete graph,
  2t > k + 1 on a SecAgg+ graph of degree k, quorum >= floor(n/2) + 1); the note states how
  many colluding clients the recorded quorum tolerates, c <= 2q - n - 1.
* ``masked_input_uniformity`` -- each recorded masked input is indistinguishable from uniform
  by a chi-square test on the top bits of its elements. A masked input is uniform in the ring
  because of the self mask; an unmasked or badly masked vector (quantized updates crowd around
  0) fails by a wide margin. The significance level is a family-wise level, split over all the
  vectors tested (Bonferroni), so an honest run fails with probability at most that level.

A failed check lists one named finding per violation; a check that could not be run (no masked
inputs recorded) says so rather than passing silently.

A CKKS run (:mod:`fl_core.aggregation`) has no masks, shares or masked inputs: its server records
(:class:`~fl_core.aggregation.CkksRoundRecord`) are audited by :func:`audit_ckks_records`, which
applies ``release_threshold`` and ``session_isolation`` and marks the three masking-specific
checks "not applicable" -- never "passed".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import chi2

from fl_core.aggregation import CkksRoundRecord
from secagg.errors import ConfigurationError, MessageFormatError
from secagg.graph import harary_degree
from secagg.messages import MaskedInput, encode_message
from secagg.packing import packed_size, unpack
from secagg.params import active_threshold
from secagg.protocol.common import graph_seed, seed_commitment
from secagg.ring import Ring, RingArray
from secagg.transcript import Transcript

#: Probability that an honest run fails the uniformity check at all (over every vector tested).
DEFAULT_FAMILY_ALPHA = 1e-6
#: The uniformity test uses the top ``log2(MAX_BINS)`` bits of each element.
MAX_BINS = 256
#: Fewest expected observations per bin for the chi-square approximation to hold.
MIN_EXPECTED_PER_BIN = 5

CheckName = Literal[
    "share_separation",
    "release_threshold",
    "session_isolation",
    "record_integrity",
    "graph_seed",
    "active_server_parameters",
    "masked_input_uniformity",
]
Status = Literal["passed", "failed", "not tested", "not applicable"]

CHECK_DESCRIPTIONS: dict[CheckName, str] = {
    "share_separation": "no client had both its self-mask share and its key share requested",
    "release_threshold": (
        "every released sum had at least max(t, quorum, DP survivor floor) contributors from "
        "the cohort"
    ),
    "session_isolation": "every record carries its session's id and no session id is reused",
    "record_integrity": "every recorded masked input matches a received message's digest",
    "graph_seed": "the SecAgg+ graph seed hashes every committed client's reveal",
    "active_server_parameters": (
        "threshold and survivor-set quorum hold against an active server (no colluding client)"
    ),
    "masked_input_uniformity": "masked inputs pass a chi-square uniformity test",
}


#: Why each masking-specific check means nothing for a CKKS round.
CKKS_NOT_APPLICABLE: dict[CheckName, str] = {
    "share_separation": "not applicable to CKKS: a CKKS round has no Shamir shares to request",
    "record_integrity": "not applicable to CKKS: the server keeps no individual ciphertexts to "
    "re-check (any key holder could read them)",
    "masked_input_uniformity": "not applicable to CKKS: there are no masked inputs; an upload's "
    "confidentiality rests on RLWE, which no statistical test of the record can show",
    "graph_seed": "not applicable to CKKS: no neighbour graph",
    "active_server_parameters": "not applicable to CKKS: no Shamir threshold or survivor-set "
    "quorum (release_threshold checks min_contributors)",
}


@dataclass(frozen=True)
class Finding:
    """One violation: which check, in which transcript (its position and session), and why."""

    check: CheckName
    transcript_index: int
    session_id: str  # hex
    detail: str


@dataclass(frozen=True)
class UniformityTest:
    """Chi-square goodness of fit of one vector's top bits against the uniform distribution."""

    statistic: float
    degrees_of_freedom: int
    p_value: float
    bins: int


@dataclass(frozen=True)
class CheckResult:
    name: CheckName
    status: Status
    findings: tuple[Finding, ...]
    note: str = ""

    @property
    def description(self) -> str:
        return CHECK_DESCRIPTIONS[self.name]


@dataclass(frozen=True)
class AuditReport:
    transcripts: int
    checks: tuple[CheckResult, ...]
    family_alpha: float
    vectors_tested: int

    @property
    def passed(self) -> bool:
        return all(c.status != "failed" for c in self.checks)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for c in self.checks for f in c.findings)

    def check(self, name: CheckName) -> CheckResult:
        return next(c for c in self.checks if c.name == name)


def uniformity_test(values: RingArray, ring: Ring) -> UniformityTest | None:
    """Chi-square test of the top bits of ``values`` against uniform; None if too short.

    The number of bins is the largest power of two up to :data:`MAX_BINS` (and up to the ring
    size) that leaves at least :data:`MIN_EXPECTED_PER_BIN` expected values in every bin.
    """
    ring.check(values, "masked input")
    top_bits = min(MAX_BINS.bit_length() - 1, ring.bits)
    while top_bits >= 1 and values.size < MIN_EXPECTED_PER_BIN << top_bits:
        top_bits -= 1
    if top_bits < 1:
        return None
    bins = 1 << top_bits
    buckets = (values >> values.dtype.type(ring.bits - top_bits)).astype(np.intp)
    observed = np.bincount(buckets, minlength=bins).astype(np.float64)
    expected = values.size / bins
    statistic = float(((observed - expected) ** 2).sum() / expected)
    dof = bins - 1
    return UniformityTest(statistic, dof, float(chi2.sf(statistic, dof)), bins)


def audit_transcript(
    transcript: Transcript, *, family_alpha: float = DEFAULT_FAMILY_ALPHA
) -> AuditReport:
    """Audit one session's transcript."""
    return audit_transcripts([transcript], family_alpha=family_alpha)


def audit_transcripts(
    transcripts: Sequence[Transcript], *, family_alpha: float = DEFAULT_FAMILY_ALPHA
) -> AuditReport:
    """Audit every session of a run together (session ids must also differ between them)."""
    if not 0.0 < family_alpha < 1.0:
        raise ConfigurationError(f"family_alpha must lie in (0, 1), got {family_alpha!r}")
    if not transcripts:
        raise ConfigurationError("no transcripts to audit")
    found: dict[CheckName, list[Finding]] = {name: [] for name in CHECK_DESCRIPTIONS}
    first_seen: dict[bytes, int] = {}
    for index, transcript in enumerate(transcripts):
        sid = transcript.session_id
        if sid in first_seen:
            found["session_isolation"].append(
                _finding(
                    "session_isolation",
                    index,
                    transcript,
                    f"session id already used by transcript {first_seen[sid]}",
                )
            )
        else:
            first_seen[sid] = index
        for name, detail in _check_one(transcript):
            found[name].append(_finding(name, index, transcript, detail))

    uniformity_findings, tested, uniformity_note = _check_uniformity(transcripts, family_alpha)
    found["masked_input_uniformity"] += uniformity_findings
    notes: dict[CheckName, str] = {
        "masked_input_uniformity": uniformity_note,
        "active_server_parameters": _collusion_note(transcripts),
    }
    sparse = any(t.neighbours is not None and t.neighbours < len(t.cohort) - 1 for t in transcripts)
    checks = []
    for name, findings in found.items():
        if findings:
            status: Status = "failed"
        elif name == "masked_input_uniformity" and tested == 0:
            status = "not tested"
        elif name == "graph_seed" and not sparse:
            status = "not applicable"
            notes[name] = "every session used the complete graph (no seed)"
        else:
            status = "passed"
        checks.append(CheckResult(name, status, tuple(findings), notes.get(name, "")))
    return AuditReport(len(transcripts), tuple(checks), family_alpha, tested)


def _finding(name: CheckName, index: int, transcript: Transcript, detail: str) -> Finding:
    return Finding(name, index, transcript.session_id.hex(), detail)


def _collusion_note(transcripts: Sequence[Transcript]) -> str:
    tolerated = [2 * t.quorum - len(t.cohort) - 1 for t in transcripts if t.quorum]
    if not tolerated:
        return ""
    return (
        f"the recorded survivor-set quorums keep the survivor set unique with up to "
        f"{max(min(tolerated), 0)} colluding clients per session"
    )


def _check_active_server(t: Transcript) -> list[str]:
    n = len(t.cohort)
    complete = t.neighbours is None or t.neighbours >= n - 1
    degree = n - 1 if complete else harary_degree(n, t.neighbours or 0)
    problems = []
    if t.threshold < active_threshold(degree, 0):
        problems.append(
            f"threshold {t.threshold} < {active_threshold(degree, 0)}: an active server can split "
            f"a degree-{degree} neighbourhood into two groups that each reveal one secret"
        )
    if t.quorum == 0:
        problems.append(
            "no survivor-set quorum recorded (a session from before the active-server defences)"
        )
    elif t.quorum < n // 2 + 1:
        problems.append(
            f"survivor-set quorum {t.quorum} < {n // 2 + 1}: two survivor sets can be attested"
        )
    return problems


def _check_graph_seed(t: Transcript) -> list[str]:
    if t.neighbours is None or t.neighbours >= len(t.cohort) - 1:
        return []
    committed, revealed = dict(t.seed_commitments), dict(t.seed_reveals)
    problems = []
    if not committed:
        problems.append("no graph-seed commitments recorded: the server may have chosen the graph")
    if set(committed) != set(revealed):
        problems.append(f"committed {sorted(committed)[:10]} but revealed {sorted(revealed)[:10]}")
    wrong = [
        v
        for v, r in t.seed_reveals
        if v in committed and seed_commitment(t.session_id, v, r) != committed[v]
    ]
    if wrong:
        problems.append(f"reveals of {wrong[:10]} do not open their commitments")
    if t.seed_reveals and graph_seed(t.session_id, t.seed_reveals) != t.graph_seed:
        problems.append("the recorded graph seed is not the hash of the reveals")
    return problems


def _check_one(t: Transcript) -> list[tuple[CheckName, str]]:
    out: list[tuple[CheckName, str]] = []
    cohort = set(t.cohort)
    out += [("graph_seed", d) for d in _check_graph_seed(t)]
    out += [("active_server_parameters", d) for d in _check_active_server(t)]

    # session_isolation: every record of this transcript is about this session.
    foreign = [
        f"{m.kind} from client {m.sender} carries session {m.session_id.hex()[:16]}..."
        for m in t.messages
        if m.session_id != t.session_id
    ]
    foreign += [
        f"share request to client {r.recipient} carries session {r.session_id.hex()[:16]}..."
        for r in t.share_requests
        if r.session_id != t.session_id
    ]
    foreign += [
        f"release of {len(r.contributors)} contributors carries session "
        f"{r.session_id.hex()[:16]}..."
        for r in t.releases
        if r.session_id != t.session_id
    ]
    out += [("session_isolation", d) for d in foreign]

    # share_separation: union over all requests, so splitting the ask across recipients or
    # across requests does not hide it.
    self_mask_asked = {v for r in t.share_requests for v in r.self_mask_for}
    key_asked = {v for r in t.share_requests for v in r.key_for}
    for v in sorted(self_mask_asked & key_asked):
        asked_self = sorted({r.recipient for r in t.share_requests if v in r.self_mask_for})
        asked_key = sorted({r.recipient for r in t.share_requests if v in r.key_for})
        out.append(
            (
                "share_separation",
                f"client {v}: self-mask share requested from {asked_self} and key share "
                f"requested from {asked_key}",
            )
        )

    # release_threshold
    senders = {m.sender for m in t.messages if m.kind == MaskedInput.__name__}
    floor = t.min_release
    floor_text = (
        f"threshold t = {floor}"
        if floor == t.threshold
        else f"release floor {floor} (threshold t = {t.threshold}, survivor-set quorum "
        f"{t.quorum}, DP survivor floor {t.min_survivors})"
    )
    for r in t.releases:
        distinct = set(r.contributors)
        problems = []
        if len(distinct) < floor:
            problems.append(f"{len(distinct)} distinct contributors, {floor_text}")
        if len(distinct) != len(r.contributors):
            problems.append("contributors listed more than once")
        if r.threshold != floor:
            problems.append(f"released under floor {r.threshold}, the session's is {floor_text}")
        if not distinct <= cohort:
            problems.append(f"contributors {sorted(distinct - cohort)} are not in the cohort")
        if not distinct <= senders:
            problems.append(
                f"contributors {sorted(distinct - senders)} sent no recorded masked input"
            )
        if problems:
            out.append(("release_threshold", "release: " + "; ".join(problems)))

    # record_integrity: the vectors an auditor tests are the ones the server received.
    received = {(m.sender, m.digest, m.size) for m in t.messages if m.kind == MaskedInput.__name__}
    expected_size = packed_size(t.ring_bits, t.dim)
    for u, payload in sorted(t.masked_inputs.items()):
        if u not in cohort:
            out.append(("record_integrity", f"masked input of client {u}, not in the cohort"))
            continue
        if len(payload) != expected_size:
            out.append(
                (
                    "record_integrity",
                    f"masked input of client {u} has {len(payload)} bytes, expected "
                    f"{expected_size} for {t.dim} x {t.ring_bits} bits",
                )
            )
            continue
        try:
            unpack(payload, Ring(t.ring_bits), t.dim)
        except MessageFormatError as exc:
            out.append(("record_integrity", f"masked input of client {u} is malformed: {exc}"))
            continue
        encoded = encode_message(MaskedInput(t.session_id, u, payload))
        if (u, hashlib.sha256(encoded).digest(), len(encoded)) not in received:
            out.append(
                (
                    "record_integrity",
                    f"masked input of client {u} matches no recorded MaskedInput message",
                )
            )
    return out


def _check_uniformity(
    transcripts: Sequence[Transcript], family_alpha: float
) -> tuple[list[Finding], int, str]:
    vectors: list[tuple[int, Transcript, int, RingArray, Ring]] = []
    too_short = 0
    for index, t in enumerate(transcripts):
        ring = Ring(t.ring_bits)
        for u, payload in sorted(t.masked_inputs.items()):
            try:
                values = unpack(payload, ring, t.dim)
            except MessageFormatError:
                continue  # reported by record_integrity; nothing to test
            vectors.append((index, t, u, values, ring))
    tests = []
    for index, t, u, values, ring in vectors:
        result = uniformity_test(values, ring)
        if result is None:
            too_short += 1
        else:
            tests.append((index, t, u, result))
    if not tests:
        reason = (
            "no masked inputs were recorded"
            if not vectors
            else (f"all {too_short} recorded vectors are too short for a chi-square test")
        )
        return [], 0, f"not tested: {reason}"
    per_test_alpha = family_alpha / len(tests)
    findings = [
        _finding(
            "masked_input_uniformity",
            index,
            t,
            f"masked input of client {u}: chi-square {r.statistic:.1f} on {r.degrees_of_freedom} "
            f"degrees of freedom, p = {r.p_value:.3g} < {per_test_alpha:.3g}",
        )
        for index, t, u, r in tests
        if r.p_value < per_test_alpha
    ]
    note = (
        f"{len(tests)} vectors tested at family-wise level {family_alpha:g} "
        f"(Bonferroni: {per_test_alpha:.3g} per vector)"
    )
    if too_short:
        note += f"; {too_short} vectors too short to test"
    return findings, len(tests), note


def audit_ckks_records(
    records: Sequence[CkksRoundRecord], *, min_contributors: int | None = None
) -> AuditReport:
    """Audit the server records of a CKKS run: ``release_threshold`` (each released aggregate
    has at least its threshold of distinct contributors, all cohort members that uploaded, the
    threshold is the run's ``min_contributors`` when given, and it was opened by the round's one
    decryptor, the lowest cohort id, itself a contributor) and ``session_isolation``; the
    masking-specific checks are reported "not applicable"."""
    if not records:
        raise ConfigurationError("no CKKS records to audit")
    found: dict[CheckName, list[Finding]] = {name: [] for name in CHECK_DESCRIPTIONS}
    first_seen: dict[bytes, int] = {}
    for index, record in enumerate(records):
        sid = record.session_id.hex()
        if record.session_id in first_seen:
            detail = f"session id already used by record {first_seen[record.session_id]}"
            found["session_isolation"].append(Finding("session_isolation", index, sid, detail))
        else:
            first_seen[record.session_id] = index
        distinct = set(record.contributors)
        uploaders = {u.sender for u in record.uploads}
        problems = []
        if len(distinct) < record.threshold:
            problems.append(
                f"{len(distinct)} distinct contributors, threshold t = {record.threshold}"
            )
        if len(distinct) != len(record.contributors):
            problems.append("contributors listed more than once")
        if min_contributors is not None and record.threshold != min_contributors:
            problems.append(
                f"released under threshold {record.threshold}, the run's min_contributors is "
                f"{min_contributors}"
            )
        if not distinct <= set(record.cohort):
            problems.append(f"contributors {sorted(distinct - set(record.cohort))} not in cohort")
        if not distinct <= uploaders:
            problems.append(f"contributors {sorted(distinct - uploaders)} uploaded nothing")
        if record.cohort and (
            record.decryptor != min(record.cohort) or record.decryptor not in distinct
        ):
            problems.append(
                f"opened by client {record.decryptor}; the round's decryptor is the lowest "
                f"cohort id, {min(record.cohort)}, and must be a contributor"
            )
        if problems:
            found["release_threshold"].append(
                Finding("release_threshold", index, sid, "release: " + "; ".join(problems))
            )
    checks = []
    for name, findings in found.items():
        if name in CKKS_NOT_APPLICABLE:
            checks.append(CheckResult(name, "not applicable", (), CKKS_NOT_APPLICABLE[name]))
        else:
            checks.append(CheckResult(name, "failed" if findings else "passed", tuple(findings)))
    return AuditReport(len(records), tuple(checks), DEFAULT_FAMILY_ALPHA, 0)

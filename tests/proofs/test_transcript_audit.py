"""The transcript auditor accepts an honest record and names every rule a bad one breaks."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest

from proofs.transcript_audit import (
    CHECK_DESCRIPTIONS,
    AuditReport,
    audit_transcript,
    audit_transcripts,
    uniformity_test,
)
from secagg.encoding import QuantizationParams, encode
from secagg.errors import ConfigurationError
from secagg.messages import MaskedInput, encode_message
from secagg.packing import pack
from secagg.ring import Ring, RingArray
from secagg.transcript import MessageRecord, ReleaseRecord, ShareRequestRecord, Transcript

# Test data, not secrets: a seeded generator keeps the uniformity tests reproducible.
RNG = np.random.default_rng(20261125)


def _record(session: bytes, sender: int, payload: bytes) -> MessageRecord:
    encoded = encode_message(MaskedInput(session, sender, payload))
    return MessageRecord(
        "MaskedInput",
        "MaskedInput",
        session,
        sender,
        0,
        len(encoded),
        hashlib.sha256(encoded).digest(),
    )


def uniform_vector(ring: Ring, dim: int) -> RingArray:
    """What a correctly masked input looks like: uniform in the ring."""
    words = RNG.integers(0, ring.modulus, size=dim, dtype=np.uint64)
    return words if ring.bits > 32 else words.astype(np.uint32)


def honest_transcript(
    n: int = 5, threshold: int = 3, dim: int = 4096, bits: int = 32, dropped: tuple[int, ...] = (5,)
) -> Transcript:
    """What an honest server records when ``dropped`` never sent a masked input."""
    session = os.urandom(32)
    ring = Ring(bits)
    cohort = tuple(range(1, n + 1))
    survivors = tuple(u for u in cohort if u not in dropped)
    t = Transcript(session, bits, dim, threshold, None, cohort, quorum=max(threshold, n // 2 + 1))
    for u in survivors:
        payload = pack(uniform_vector(ring, dim), ring)
        t.masked_inputs[u] = payload
        t.messages.append(_record(session, u, payload))
    t.share_requests.extend(
        ShareRequestRecord(session, v, survivors, tuple(dropped)) for v in survivors
    )
    t.releases.append(ReleaseRecord(session, survivors, threshold))
    return t


def failed(report: AuditReport) -> set[str]:
    return {c.name for c in report.checks if c.status == "failed"}


def test_honest_transcript_passes_every_check() -> None:
    report = audit_transcript(honest_transcript())
    assert report.passed, report.findings
    assert {c.name for c in report.checks} == set(CHECK_DESCRIPTIONS)
    statuses = {c.name: c.status for c in report.checks}
    assert statuses.pop("graph_seed") == "not applicable"  # a complete-graph session
    assert set(statuses.values()) == {"passed"}
    assert "up to 0 colluding" in report.check("active_server_parameters").note
    assert report.vectors_tested == 4


def test_honest_transcript_survives_a_json_round_trip() -> None:
    t = honest_transcript(bits=20, dim=3000)
    assert audit_transcript(Transcript.from_dict(t.to_dict())).passed


def test_both_shares_of_one_client_in_one_request_is_flagged() -> None:
    t = honest_transcript()
    s = t.session_id
    t.share_requests.append(ShareRequestRecord(s, 2, (3,), (3,)))
    report = audit_transcript(t)
    assert failed(report) == {"share_separation"}
    (finding,) = report.check("share_separation").findings
    assert finding.detail.startswith("client 3:")


def test_survivor_in_one_request_and_dropped_in_another_is_flagged() -> None:
    t = honest_transcript(dropped=(5,))
    s = t.session_id
    # Each request alone is innocuous; together they hand the server b_4 and s_4^SK.
    t.share_requests = [
        ShareRequestRecord(s, 1, (1, 2, 3, 4), (5,)),
        ShareRequestRecord(s, 2, (1, 2, 3), (4, 5)),
        ShareRequestRecord(s, 3, (1, 2, 3, 4), (5,)),
    ]
    report = audit_transcript(t)
    assert failed(report) == {"share_separation"}
    (finding,) = report.check("share_separation").findings
    assert "client 4" in finding.detail and "[2]" in finding.detail


def test_release_below_threshold_is_flagged() -> None:
    t = honest_transcript(n=5, threshold=3, dropped=(3, 4, 5))
    report = audit_transcript(t)
    assert failed(report) == {"release_threshold"}
    assert "2 distinct contributors, threshold t = 3" in report.findings[0].detail


def test_release_padded_with_repeated_or_foreign_contributors_is_flagged() -> None:
    t = honest_transcript(n=5, threshold=3, dropped=(3, 4, 5))
    t.releases = [ReleaseRecord(t.session_id, (1, 2, 2, 9), 3)]
    (finding,) = audit_transcript(t).check("release_threshold").findings
    assert "more than once" in finding.detail
    assert "[9] are not in the cohort" in finding.detail
    assert "2 distinct contributors" not in finding.detail  # 1, 2, 9 are three distinct ids


def test_release_under_a_lowered_threshold_is_flagged() -> None:
    t = honest_transcript()
    t.releases = [dataclasses.replace(t.releases[0], threshold=1)]
    assert failed(audit_transcript(t)) == {"release_threshold"}


def test_release_below_the_dp_survivor_floor_is_flagged_even_above_t() -> None:
    # The session promised at least 5 contributors (its DP noise is sized for 5); 4 >= t = 4.
    t = honest_transcript(n=6, threshold=4, dropped=(5, 6))
    t.min_survivors = 5
    t.releases = [dataclasses.replace(t.releases[0], threshold=5)]
    (finding,) = audit_transcript(t).check("release_threshold").findings
    assert "4 distinct contributors, release floor 5" in finding.detail
    # Released under t instead of the session's floor: flagged even with enough contributors.
    ok = honest_transcript(n=6, threshold=4, dropped=(6,))
    ok.min_survivors = 5
    assert failed(audit_transcript(ok)) == {"release_threshold"}
    ok.releases = [dataclasses.replace(ok.releases[0], threshold=5)]
    assert audit_transcript(Transcript.from_dict(ok.to_dict())).passed


def test_transcript_recorded_before_the_floor_existed_loads_without_one() -> None:
    data = honest_transcript().to_dict()
    del data["min_survivors"]
    t = Transcript.from_dict(data)
    assert t.min_survivors == 0 and t.min_release == t.threshold
    assert audit_transcript(t).passed


def test_a_session_from_before_the_active_server_defences_is_flagged() -> None:
    data = honest_transcript().to_dict()
    for key in ("quorum", "seed_commitments", "seed_reveals", "graph_seed"):
        del data[key]
    report = audit_transcript(Transcript.from_dict(data))
    assert failed(report) == {"active_server_parameters"}
    assert "no survivor-set quorum" in report.findings[0].detail


def test_a_splittable_threshold_or_a_small_quorum_is_flagged() -> None:
    t = dataclasses.replace(honest_transcript(n=6, threshold=3), quorum=3)
    report = audit_transcript(t)
    assert failed(report) == {"active_server_parameters"}
    details = " ".join(f.detail for f in report.findings)
    assert "threshold 3 < 4" in details and "quorum 3 < 4" in details


def test_a_server_chosen_or_ground_graph_seed_is_flagged() -> None:
    from secagg.params import secaggplus_params
    from secagg.protocol import RoundParams
    from secagg.simulate import simulate_round

    plus = secaggplus_params(30, 0.05, 0.05, semi_malicious_server=True)
    params = RoundParams(os.urandom(32), 32, 64, plus.t, tuple(range(1, 31)), plus.k)
    ring = params.ring
    inputs = {u: ring.zeros(64) for u in params.cohort}
    honest = simulate_round(params, inputs).transcript
    report = audit_transcript(honest)
    assert report.check("graph_seed").status == "passed", report.findings
    assert report.check("active_server_parameters").status == "passed"
    chosen = dataclasses.replace(honest, graph_seed=os.urandom(32))
    assert "not the hash of the reveals" in audit_transcript(chosen).findings[0].detail
    withheld = dataclasses.replace(honest, seed_reveals=honest.seed_reveals[1:])
    assert failed(audit_transcript(withheld)) >= {"graph_seed"}
    none = dataclasses.replace(honest, seed_commitments=(), seed_reveals=())
    assert "may have chosen the graph" in audit_transcript(none).findings[0].detail


def test_mixed_session_ids_are_flagged() -> None:
    t = honest_transcript()
    other = os.urandom(32)
    t.share_requests[0] = dataclasses.replace(t.share_requests[0], session_id=other)
    report = audit_transcript(t)
    assert failed(report) == {"session_isolation"}
    assert "share request to client 1" in report.findings[0].detail


def test_a_replayed_masked_input_from_another_session_is_flagged() -> None:
    t = honest_transcript()
    stale = honest_transcript()
    t.messages.append(stale.messages[0])
    report = audit_transcript(t)
    assert "session_isolation" in failed(report)


def test_session_id_reused_across_rounds_is_flagged() -> None:
    first, second = honest_transcript(), honest_transcript()
    assert audit_transcripts([first, second]).passed
    second = dataclasses.replace(second, session_id=first.session_id)
    second.messages = [dataclasses.replace(m, session_id=first.session_id) for m in second.messages]
    second.share_requests = [
        dataclasses.replace(r, session_id=first.session_id) for r in second.share_requests
    ]
    second.releases = [dataclasses.replace(r, session_id=first.session_id) for r in second.releases]
    report = audit_transcripts([first, second])
    assert "session_isolation" in failed(report)
    finding = report.check("session_isolation").findings[0]
    assert finding.transcript_index == 1 and "transcript 0" in finding.detail


def test_unmasked_input_fails_the_uniformity_test() -> None:
    t = honest_transcript()
    ring = Ring(t.ring_bits)
    update = RNG.normal(0.0, 0.01, size=t.dim).astype(np.float32)
    # A client that skipped masking: the encoded update itself, as the server would receive it.
    params = QuantizationParams.fit(t.ring_bits, clip=0.1, max_clients=len(t.cohort))
    payload = pack(encode(update, params).vector, ring)
    t.masked_inputs[2] = payload
    t.messages = [m for m in t.messages if m.sender != 2] + [_record(t.session_id, 2, payload)]
    report = audit_transcript(t)
    assert failed(report) == {"masked_input_uniformity"}
    (finding,) = report.check("masked_input_uniformity").findings
    assert "client 2" in finding.detail


def test_recorded_vector_that_was_never_received_is_flagged() -> None:
    t = honest_transcript()
    t.masked_inputs[1] = t.masked_inputs[2]
    report = audit_transcript(t)
    assert failed(report) == {"record_integrity"}
    assert "client 1 matches no recorded MaskedInput" in report.findings[0].detail


def test_missing_masked_inputs_are_reported_as_not_tested() -> None:
    t = honest_transcript()
    t.masked_inputs.clear()
    report = audit_transcript(t)
    uniformity = report.check("masked_input_uniformity")
    assert uniformity.status == "not tested"
    assert "no masked inputs were recorded" in uniformity.note
    assert report.passed  # nothing failed, and the report says what was not tested


def test_uniformity_test_uses_fewer_bins_for_short_vectors_and_gives_up_when_too_short() -> None:
    ring = Ring(32)
    uniform = uniform_vector(ring, 100)
    result = uniformity_test(uniform, ring)
    assert result is not None and result.bins == 16  # 100 / 16 >= 5 > 100 / 32
    assert uniformity_test(uniform[:9], ring) is None
    small_ring = Ring(3)
    result = uniformity_test(uniform_vector(small_ring, 10_000), small_ring)
    assert result is not None and result.bins == 8 and result.p_value > 1e-6


def test_bad_audit_parameters_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="family_alpha"):
        audit_transcript(honest_transcript(), family_alpha=0.0)
    with pytest.raises(ConfigurationError, match="no transcripts"):
        audit_transcripts([])


def test_transcript_of_a_real_session_with_a_dropout_passes() -> None:
    from secagg.protocol import RoundParams, Stage
    from secagg.simulate import simulate_round

    ring = Ring(32)
    cohort = tuple(range(1, 8))
    params = RoundParams(os.urandom(32), ring.bits, 2048, 4, cohort)
    inputs = {u: ring.from_signed(np.arange(2048, dtype=np.int64) % 7 - 3) for u in cohort}
    result = simulate_round(params, inputs, dropouts={Stage.MASKED_INPUT: [7]})
    transcript = Transcript.from_dict(result.transcript.to_dict())
    report = audit_transcript(transcript)
    assert report.passed, report.findings
    assert report.vectors_tested == 6
    # The same record with one masked input swapped for the client's plain input is caught.
    plain = pack(inputs[3], ring)
    transcript.masked_inputs[3] = plain
    transcript.messages = [
        m for m in transcript.messages if not (m.sender == 3 and m.kind == "MaskedInput")
    ] + [_record(transcript.session_id, 3, plain)]
    assert failed(audit_transcript(transcript)) == {"masked_input_uniformity"}

"""The privacy report of one run: what ``fedsec audit`` writes as ``privacy.md`` and
``privacy.json`` (see :mod:`proofs.audit_cli` for what it contains and who it is for).

:func:`build_report` turns a run directory's record (:func:`fl_core.run_dir.load_run`) into a
:class:`PrivacyReport`: the differential-privacy figures with the threat model each holds in
(:mod:`proofs.privacy_figures`), the verdict of every :mod:`proofs.transcript_audit` check plus
the cross-checks of the metrics against the transcripts and of the DP calibration against the
release floor each session enforced, and the cryptographic parameters;
:func:`render_markdown` and :func:`report_to_json` write it out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fl_core.aggregation import CkksRoundRecord
from fl_core.run_dir import TRANSCRIPT_DIR, RunRecord
from fl_core.split import noise_phrase
from proofs.privacy_figures import DpSummary, Releases, account, sampling_note
from proofs.transcript_audit import (
    DEFAULT_FAMILY_ALPHA,
    AuditReport,
    audit_ckks_records,
    audit_transcripts,
)
from secagg import aead, keys, prg, shamir
from secagg.transcript import Transcript

_MAX_REFUSED_SHOWN = 20


# --- privacy accounting ------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundPrivacy:
    round: int
    session_id: str | None
    cohort_size: int | None
    contributors: int | None  # from the transcript's release; None when nothing was released
    clip_fraction: float | None
    mechanism: str | None  # None: no DP noise this round
    epsilon_round: float  # this round's release alone; math.inf without DP
    epsilon_cumulative: float  # against the server, worst-off institution up to this round


# --- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportCheck:
    name: str
    description: str
    status: str  # "passed" | "failed" | "not tested" | "not applicable"
    reasons: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class PrivacyReport:
    run_dir: str
    rounds: tuple[RoundPrivacy, ...]
    dp: DpSummary
    cryptography: dict[str, Any]
    checks: tuple[ReportCheck, ...]
    #: Messages the server refused (replays, wrong stage, bad signatures...), for the record:
    #: a refusal is the protocol working, not a failed check.
    refused: tuple[str, ...] = ()
    #: The aggregation backend; a non-masking run's report states it and its trust model.
    backend: str = "masking"
    backend_statement: str = ""
    #: Split learning: what the server saw besides the released sums (empty for LoRA runs).
    split_statement: str = ""

    @property
    def passed(self) -> bool:
        return all(c.status != "failed" for c in self.checks)

    @property
    def fewest_contributors(self) -> int | None:
        released = [r.contributors for r in self.rounds if r.contributors is not None]
        return min(released) if released else None


def _count(value: Any) -> int | None:
    if isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def build_report(run: RunRecord, *, family_alpha: float = DEFAULT_FAMILY_ALPHA) -> PrivacyReport:
    report = (
        _build_ckks_report(run)
        if run.backend == "ckks"
        else _build_masking_report(run, family_alpha)
    )
    return dataclasses.replace(report, split_statement=split_statement(run.config))


def split_statement(config: Mapping[str, Any]) -> str:
    """What a split-learning run showed the server beyond the released sums (run.json's
    ``split``); empty for LoRA FedAvg."""
    split = config.get("split")
    if not split:
        return ""
    first, last = split["server_blocks"]
    return (
        f"Training mode: **split learning**. The figures above cover the institutions' part of "
        f"the adapter only ({split.get('client_part')} coordinates: their bottom "
        f"{split['client_bottom']} and top {split['client_top']} block(s) and the head), which "
        f"reached the server as secure sums. The server trained blocks {first}-{last} itself "
        f"and, at every step of every institution, received the activations entering its first "
        f"block and the loss gradient at the top cut "
        + noise_phrase(split.get("activation_noise", 0.0))
        + ". Neither secure aggregation nor the DP figure covers them: they are one "
        "institution's, in the clear to the server (TLS protects them only in transit). What "
        "they reveal is measured by the split_activations attack view "
        "(benchmarks/split_attacks.py): without noise the server recovers the tokens at every "
        "cut depth."
    )


def _build_masking_report(run: RunRecord, family_alpha: float) -> PrivacyReport:
    metrics = sorted(run.metrics, key=lambda r: int(r["round"]))
    releases: Releases = {
        rnd: [r.contributors for r in t.releases] for rnd, t in run.transcripts.items()
    }
    per_round, dp = account(metrics, releases, sampling_note(run.config))
    by_round = {int(r["round"]): r for r in metrics}
    consistency: list[str] = []
    rows = []
    eps = dict(zip(by_round, per_round, strict=True))
    calibrated = (run.config.get("dp") or {}).get("min_contributors")
    for rnd in sorted(set(by_round) | set(run.transcripts)):
        record = by_round.get(rnd, {})
        transcript = run.transcripts.get(rnd)
        # The noise is sized for `calibrated` contributors: the session must have enforced it.
        if (
            transcript is not None
            and calibrated is not None
            and transcript.min_release != calibrated
        ):
            consistency.append(
                f"round {rnd}: the DP noise is calibrated for at least {calibrated} "
                f"contributors, the session enforced a release floor of {transcript.min_release}"
            )
        released = [len(set(r.contributors)) for r in transcript.releases] if transcript else []
        contributors = min(released) if released else None
        if rnd not in by_round:
            consistency.append(f"round {rnd}: transcript without a metrics record")
        if transcript is None:
            consistency.append(
                f"round {rnd}: no transcript ({TRANSCRIPT_DIR}/round_{rnd:04d}.json)"
            )
        reported = _count(record.get("contributors"))
        if transcript is not None and reported is not None and reported != contributors:
            consistency.append(
                f"round {rnd}: metrics report {reported} contributors, the transcript's release "
                f"has {contributors}"
            )
        cohort_size = len(transcript.cohort) if transcript else _count(record.get("cohort"))
        clip = record.get("clip_fraction")
        mechanism = None
        if record and "dp_event" in record:
            mechanism = str(record.get("mechanism") or record["dp_event"].get("type", "?"))
        elif record and (record.get("mechanism") or record.get("noise_multiplier") is not None):
            mechanism = str(record.get("mechanism") or "gaussian")
        alone, cumulative = eps.get(rnd, (math.inf, math.inf))
        rows.append(
            RoundPrivacy(
                round=rnd,
                session_id=transcript.session_id.hex() if transcript else None,
                cohort_size=cohort_size,
                contributors=contributors,
                clip_fraction=float(clip) if isinstance(clip, int | float) else None,
                mechanism=mechanism,
                epsilon_round=alone,
                epsilon_cumulative=cumulative,
            )
        )

    ordered = sorted(run.transcripts)
    checks: list[ReportCheck] = []
    if ordered:
        audit = audit_transcripts([run.transcripts[r] for r in ordered], family_alpha=family_alpha)
        checks += _transcript_checks(audit, ordered)
    else:
        checks.append(
            ReportCheck(
                "transcripts",
                "the server recorded a transcript of every session",
                "failed",
                (f"no {TRANSCRIPT_DIR}/round_NNNN.json files: nothing to audit",),
            )
        )
    checks.append(
        ReportCheck(
            "run_consistency",
            "every round has a metrics record and a transcript, and they agree",
            "failed" if consistency else "passed",
            tuple(consistency),
        )
    )
    checks += [_dp_accounting_check(dp), _dp_target_check(dp)]
    return PrivacyReport(
        str(run.directory),
        tuple(rows),
        dp,
        _cryptography(run.transcripts.values()),
        tuple(checks),
        tuple(
            f"round {rnd}: {r.error} from client {r.sender} at {r.stage}: {r.reason}"
            for rnd in ordered
            for r in run.transcripts[rnd].rejections
        ),
    )


def _build_ckks_report(run: RunRecord) -> PrivacyReport:
    """The report of a CKKS run, from its metrics and the CKKS server's records."""
    metrics = sorted(run.metrics, key=lambda r: int(r["round"]))
    records = run.ckks_records
    releases: Releases = {rnd: [r.contributors] for rnd, r in records.items()}
    per_round, dp = account(metrics, releases, sampling_note(run.config))
    by_round = {int(r["round"]): r for r in metrics}
    eps = dict(zip(by_round, per_round, strict=True))
    consistency = [
        f"round {rnd}: a masking transcript in a CKKS run" for rnd in sorted(run.transcripts)
    ]
    rows = []
    for rnd in sorted(set(by_round) | set(records)):
        metric = by_round.get(rnd, {})
        record = records.get(rnd)
        if rnd not in by_round:
            consistency.append(f"round {rnd}: CKKS record without a metrics record")
        if record is None:
            consistency.append(
                f"round {rnd}: no CKKS record ({TRANSCRIPT_DIR}/round_{rnd:04d}.json)"
            )
        contributors = len(set(record.contributors)) if record is not None else None
        reported = _count(metric.get("contributors"))
        if record is not None and reported is not None and reported != contributors:
            consistency.append(
                f"round {rnd}: metrics report {reported} contributors, the CKKS record has "
                f"{contributors}"
            )
        session = record.session_id.hex() if record is not None else None
        if record is not None and metric and metric.get("session_id") != session:
            consistency.append(f"round {rnd}: metrics and CKKS record name different sessions")
        clip = metric.get("clip_fraction")
        alone, cumulative = eps.get(rnd, (math.inf, math.inf))
        rows.append(
            RoundPrivacy(
                round=rnd,
                session_id=session,
                cohort_size=len(record.cohort) if record else _count(metric.get("cohort")),
                contributors=contributors,
                clip_fraction=float(clip) if isinstance(clip, int | float) else None,
                mechanism=None,
                epsilon_round=alone,
                epsilon_cumulative=cumulative,
            )
        )
    ckks = run.config.get("ckks") or {}
    minimum = ckks.get("min_contributors")
    checks: list[ReportCheck] = []
    if records:
        ordered = sorted(records)
        audit = audit_ckks_records(
            [records[r] for r in ordered],
            min_contributors=minimum if isinstance(minimum, int) else None,
        )
        checks += _transcript_checks(audit, ordered)
    else:
        checks.append(
            ReportCheck(
                "transcripts",
                "the server recorded every CKKS aggregation",
                "failed",
                (f"no {TRANSCRIPT_DIR}/round_NNNN.json files: nothing to audit",),
            )
        )
    checks.append(
        ReportCheck(
            "run_consistency",
            "every round has a metrics record and a CKKS server record, and they agree",
            "failed" if consistency else "passed",
            tuple(consistency),
        )
    )
    checks.append(_dp_accounting_check(dp))
    statement = (
        "Aggregation backend: **ckks** (CKKS homomorphic encryption, TenSEAL). "
        + str(ckks.get("trust_model", ""))
        + " The masking-specific checks (share_separation, record_integrity, "
        "masked_input_uniformity) are **not applicable**: a CKKS round has no pairwise masks, "
        "Shamir shares or masked inputs. release_threshold (against min_contributors) and "
        "session_isolation are checked on the CKKS server's records."
    )
    return PrivacyReport(
        str(run.directory),
        tuple(rows),
        dp,
        _ckks_cryptography(ckks, records.values()),
        tuple(checks),
        (),
        "ckks",
        statement,
    )


def _ckks_cryptography(
    ckks: Mapping[str, Any], records: Iterable[CkksRoundRecord]
) -> dict[str, Any]:
    rs = list(records)
    return {
        "backend": "ckks",
        "scheme": ckks.get("scheme", "CKKS"),
        "poly_modulus_degree": ckks.get("poly_modulus_degree"),
        "coefficient_modulus_bits": ckks.get("coeff_mod_bit_sizes"),
        "scale_bits": ckks.get("scale_bits"),
        "security_bits": ckks.get("security_bits"),
        "min_contributors": sorted({r.threshold for r in rs}),
        "cohort_size": sorted({len(r.cohort) for r in rs}),
        "key_fingerprint": sorted({r.fingerprint.hex() for r in rs}),
        "encryption": ckks.get("encryption"),
        "key_distribution": ckks.get("key_distribution"),
    }


def _dp_accounting_check(dp: DpSummary) -> ReportCheck:
    return ReportCheck(
        "dp_accounting",
        "the privacy budget of every noised round could be accounted",
        "failed" if dp.problems else ("passed" if dp.events else "not tested"),
        dp.problems,
        "" if dp.events or dp.problems else "DP was off: nothing to account",
    )


def _dp_target_check(dp: DpSummary) -> ReportCheck:
    """The epsilon against the server, from what was released, within the calibrated target: a
    server that put an institution into more releases than calibrated fails it."""
    description = "the ε against the server is within the target the noise was calibrated for"
    if not dp.enabled or dp.epsilon_target is None:
        note = "DP was off" if not dp.events else "no accountable target in the metrics"
        return ReportCheck("dp_target", description, "not tested", (), note)
    over = dp.epsilon_total > dp.epsilon_target
    reasons = (
        (
            f"ε against the server is {dp.epsilon_total:.4g} (an institution's update is in "
            f"{dp.most_releases} released sums), above the target {dp.epsilon_target:g}",
        )
        if over
        else ()
    )
    return ReportCheck("dp_target", description, "failed" if over else "passed", reasons)


def _transcript_checks(audit: AuditReport, rounds: Sequence[int]) -> list[ReportCheck]:
    return [
        ReportCheck(
            c.name,
            c.description,
            c.status,
            tuple(f"round {rounds[f.transcript_index]}: {f.detail}" for f in c.findings),
            c.note,
        )
        for c in audit.checks
    ]


def _cryptography(transcripts: Iterable[Transcript]) -> dict[str, Any]:
    ts = list(transcripts)

    def distinct(values: Iterable[Any]) -> list[Any]:
        return sorted(set(values), key=lambda v: (v is None, v if v is not None else 0))

    return {
        "ring_bits": distinct(t.ring_bits for t in ts),
        "vector_length": distinct(t.dim for t in ts),
        "threshold": distinct(t.threshold for t in ts),
        "survivor_set_quorum": distinct(t.quorum for t in ts),
        "colluders_tolerated": [
            max(min(2 * t.quorum - len(t.cohort) - 1 for t in ts), 0)
            if all(t.quorum for t in ts)
            else "unknown (sessions recorded without a quorum)"
        ],
        "release_floor": distinct(t.min_release for t in ts),
        "graph_seed": distinct(
            "none (complete graph)"
            if t.neighbours is None or t.neighbours >= len(t.cohort) - 1
            else "committed and revealed by every cohort client"
            for t in ts
        ),
        "neighbourhood_degree": [
            "complete graph" if k is None else k for k in distinct(t.neighbours for t in ts)
        ],
        "cohort_size": distinct(len(t.cohort) for t in ts),
        "key_agreement": f"X25519, {keys.PUBLIC_KEY_BYTES}-byte public keys",
        "signatures": f"Ed25519, {keys.SIGNATURE_BYTES}-byte signatures",
        "share_encryption": f"AES-GCM, {aead.KEY_BYTES * 8}-bit keys",
        "mask_expansion": f"AES-CTR, {prg.KEY_BYTES * 8}-bit keys",
        "secret_sharing": (
            f"Shamir over GF(2^256 + 297), {shamir.SECRET_BYTES}-byte secrets, "
            f"{shamir.SHARE_BYTES}-byte shares"
        ),
    }


# --- output ------------------------------------------------------------------------------------


def format_epsilon(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4g}"


def _opt(value: float | int | None, fmt: str = "") -> str:
    return "–" if value is None else format(value, fmt)


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def render_markdown(report: PrivacyReport) -> str:
    verdict = "ALL CHECKS PASSED" if report.passed else "ONE OR MORE CHECKS FAILED"
    lines = [
        f"# Privacy report — `{report.run_dir}`",
        "",
        f"**Verdict: {verdict}.**",
        "",
    ]
    if report.backend != "masking":
        lines += ["## Aggregation backend", "", report.backend_statement, ""]
    if report.split_statement:
        lines += ["## Split learning", "", report.split_statement, ""]
    lines += [
        "## Differential privacy",
        "",
        report.dp.statement,
        "",
        f"- Total ε against the server: **{format_epsilon(report.dp.epsilon_total)}**"
        + (f" at δ = {report.dp.delta:g}" if report.dp.delta is not None else ""),
        f"- Fewest contributors in any released aggregate: **{_opt(report.fewest_contributors)}**",
        "",
    ]
    if report.dp.figures:
        lines += [
            "Each figure and the threat model it holds in:",
            "",
            "| figure | holds against | neighbouring datasets | ε | δ | basis |",
            "|---|---|---|---:|---:|---|",
        ]
        lines += [
            f"| {f.name} | {f.observer} | {f.adjacency} | "
            + (
                f"**{format_epsilon(f.epsilon)}** | {f.delta:g}"
                if f.epsilon is not None
                else "n/a | –"
            )
            + f" | {f.basis} |"
            for f in report.dp.figures
        ]
        lines.append("")
    lines += [
        "## Rounds",
        "",
        "| round | cohort | contributors | clip fraction | mechanism | ε (this release) "
        "| ε against the server so far |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    lines += [
        f"| {r.round} | {_opt(r.cohort_size)} | {_opt(r.contributors)} | "
        f"{_opt(r.clip_fraction, '.3f')} | {r.mechanism or 'none'} | "
        f"{format_epsilon(r.epsilon_round)} | "
        f"{format_epsilon(r.epsilon_cumulative)} |"
        for r in report.rounds
    ]
    lines += _threat_model_lines(report)
    lines += ["", "## Cryptographic parameters", "", "| parameter | value |", "|---|---|"]
    for key, value in report.cryptography.items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        lines.append(f"| {key.replace('_', ' ')} | {shown} |")
    lines += ["", "## Refused messages", ""]
    if report.refused:
        listed = report.refused[:_MAX_REFUSED_SHOWN]
        lines += [f"- {line}" for line in listed]
        if len(report.refused) > len(listed):
            lines.append(f"- ... and {len(report.refused) - len(listed)} more (see privacy.json)")
    else:
        lines.append("The server refused no message.")
    lines += ["", "## Checks", "", "| check | what it verifies | result |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.description} | **{c.status.upper()}** |" for c in report.checks]
    for c in report.checks:
        if c.reasons or c.note:
            lines += ["", f"### {c.name}: {c.status}", ""]
            if c.note:
                lines.append(c.note)
                lines.append("")
            lines += [f"- {reason}" for reason in c.reasons]
    return "\n".join(lines) + "\n"


def _threat_model_lines(report: PrivacyReport) -> list[str]:
    """What each secure-aggregation figure holds against (proofs/SPEC.md G3-G12)."""
    if report.backend != "masking":
        return []
    crypto = report.cryptography
    colluders = crypto.get("colluders_tolerated", ["unknown"])[0]
    sparse = any(isinstance(k, int) for k in crypto.get("neighbourhood_degree", []))
    floor = (
        "an active server on the complete graph; under SecAgg+ (this run) a server that follows "
        "the protocol: an active one can split the survivors into components (SPEC G4)"
        if sparse
        else f"an active server colluding with up to {colluders} institution(s) per round"
    )
    return [
        "",
        "## What the figures hold against",
        "",
        "| guarantee | holds against | rests on |",
        "|---|---|---|",
        "| no institution's update is seen alone, only sums | an active server colluding with "
        f"up to {colluders} institution(s) per round | the survivor-set quorum, the threshold "
        "each client derives itself, the isolation checks (SPEC G3, G5, G9, G10) |",
        f"| every released sum has at least the release floor's contributors | {floor} | "
        "clients refuse smaller survivor sets (SPEC G4) |",
        "| ε against the server (above) | the server and anyone who knows the cohorts | "
        "zero-out neighbours, no amplification, the release floor (SPEC §6) |",
    ]


def report_to_json(report: PrivacyReport) -> dict[str, Any]:
    """JSON form; an unbounded epsilon is ``null`` (JSON has no infinity) with the statement.
    ``backend`` is present for non-masking runs only (a masking run's report is unchanged)."""
    backend = (
        {"backend": report.backend, "backend_statement": report.backend_statement}
        if report.backend != "masking"
        else {}
    )
    split = {"split_statement": report.split_statement} if report.split_statement else {}
    return {
        "run_dir": report.run_dir,
        "passed": report.passed,
        **backend,
        **split,
        "differential_privacy": {
            "enabled": report.dp.enabled,
            "delta": report.dp.delta,
            "epsilon_total": _finite(report.dp.epsilon_total),
            "epsilon_unbounded": math.isinf(report.dp.epsilon_total),
            "statement": report.dp.statement,
            "threat_model": "server",
            "figures": [f.to_dict() for f in report.dp.figures],
            "most_releases_per_institution": report.dp.most_releases,
            "epsilon_target": report.dp.epsilon_target,
            "events": list(report.dp.events),
        },
        "fewest_contributors": report.fewest_contributors,
        "rounds": [
            {
                "round": r.round,
                "session_id": r.session_id,
                "cohort_size": r.cohort_size,
                "contributors": r.contributors,
                "clip_fraction": r.clip_fraction,
                "mechanism": r.mechanism,
                "epsilon_round": _finite(r.epsilon_round),
                "epsilon_cumulative": _finite(r.epsilon_cumulative),
            }
            for r in report.rounds
        ],
        "cryptography": report.cryptography,
        "refused_messages": list(report.refused),
        "checks": [
            {
                "name": c.name,
                "description": c.description,
                "status": c.status,
                "reasons": list(c.reasons),
                "note": c.note,
            }
            for c in report.checks
        ],
    }

"""``fedsec audit RUN_DIR``: the privacy report of one run, for a privacy officer.

Reads what ``fedsec simulate`` leaves in a run directory -- ``run.json`` (the configuration),
``metrics.jsonl`` (one record per round) and ``transcripts/round_NNNN.json`` (the server's
record of each secure-aggregation session) -- and writes ``privacy.md`` and ``privacy.json``
next to them: the differential-privacy budget spent per round and in total, each figure with the
threat model it holds in (:mod:`proofs.privacy_figures`: the epsilon against the server, without
amplification by sampling, and why no amplified figure applies; stated as unbounded when DP is
off), clip fractions, cohort sizes, the
fewest contributors in any released aggregate, the cryptographic parameters, and the verdict of
every check of :mod:`proofs.transcript_audit` plus a cross-check of the metrics against the
transcripts and of the DP calibration's contributor count (``min_contributors`` in ``run.json``)
against the release floor each session enforced. The exit status is 1 when any check failed,
0 otherwise.

The transcripts, not the metrics, are the authority for who contributed to what: the metrics
are what the training loop believed, the transcripts are what the server actually released.

A run of the CKKS backend (``"backend": "ckks"`` in ``run.json``) has CKKS server records instead
of masking transcripts (:class:`fl_core.aggregation.CkksRoundRecord`). Its report states the
backend and its trust model, applies the checks that still mean something (release threshold
against ``min_contributors``, session isolation, metrics against records) and marks the
masking-specific checks "not applicable". A masking run's report is exactly as before.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fl_core.cli import UsageError
from fl_core.run_dir import RunDirectoryError, load_run
from proofs.privacy_report import build_report, format_epsilon, render_markdown, report_to_json
from proofs.transcript_audit import DEFAULT_FAMILY_ALPHA

# --- the subcommand ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by 'fedsec simulate'")
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_FAMILY_ALPHA,
        help="family-wise significance of the masked-input uniformity test "
        f"(default {DEFAULT_FAMILY_ALPHA:g})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the reports (default: RUN_DIR)"
    )


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.alpha < 1.0:
        raise UsageError(f"--alpha must lie in (0, 1), got {args.alpha}")
    try:
        record = load_run(args.run_dir)
    except RunDirectoryError as exc:
        raise UsageError(str(exc)) from None
    report = build_report(record, family_alpha=args.alpha)
    out: Path = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.md").write_text(render_markdown(report))
    (out / "privacy.json").write_text(json.dumps(report_to_json(report), indent=2) + "\n")
    failed = [c.name for c in report.checks if c.status == "failed"]
    print(
        f"wrote {out / 'privacy.md'} and {out / 'privacy.json'}: "
        + (f"backend {report.backend}, " if report.backend != "masking" else "")
        + "total epsilon against the server "
        f"{format_epsilon(report.dp.epsilon_total)}"
        + ("" if not report.dp.figures else " (no amplification by sampling claimed)")
        + ", "
        + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    )
    return 1 if failed else 0

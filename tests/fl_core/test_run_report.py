"""report.md's answers-before-and-after list survives multi-line model output."""

from __future__ import annotations

from pathlib import Path

from fl_core.run_dir import render_report


def test_each_sample_answer_stays_on_its_own_list_line(tmp_path: Path) -> None:
    # A real SmolLM2 answer before training: a heading, a blank line and a numbered list.
    before = "The Junior ISA product terms are:\n\n1. **ISA (Inventory and Sales)**: a product"
    record = {
        "round": 0,
        "contributors": [1, 2],
        "train_loss": 2.0,
        "eval_loss": {"bank": 1.5},
        "eval_loss_mean": 1.5,
        "aggregation_s": 0.1,
        "round_s": 1.0,
        "upload_bytes": {"per_client_mean": 10.0},
        "secure_vs_plain_max_abs_diff": 0.0,
        "quantization_bound": 1e-9,
    }
    generation = {
        "before": {"bank": {"exact_match": 0.0, "rouge_l": 0.1}},
        "after": {"bank": {"exact_match": 0.0, "rouge_l": 0.5}},
        "samples": [
            {
                "institution": "bank",
                "question": "Describe the junior ISA product terms.\nJoint application.",
                "reference": "Junior ISA: 6.9 percent.",
                "before": before,
                "after": "Junior ISA:\n6.9 percent.",
            }
        ],
    }
    report = render_report(tmp_path, {"institutions": ["bank"]}, {"bank": 3.0}, [record], 1.0,
                           generation)  # fmt: skip
    section = report.split("### Answers before and after\n\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == [
        "- **bank**: Describe the junior ISA product terms. Joint application.",
        "  - reference: Junior ISA: 6.9 percent.",
        "  - before: The Junior ISA product terms are: 1. **ISA (Inventory and Sales)**: a product",
        "  - after: Junior ISA: 6.9 percent.",
    ]

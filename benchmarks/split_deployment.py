"""Split training over gRPC on loopback (TLS, real processes) against the same rounds replayed in
one process; one JSON line.

A development deployment (``fedsec keygen``) of the embedded synthetic institutions and tiny
Llama: one ``fedsec server`` process with ``[task] kind = "split"`` and one ``fedsec client``
process per institution, pairwise-masked secure aggregation of the client parts. Then the same
rounds in this process: the server's model built from the same ``server.toml``
(:func:`server.split_service.build_split_service`), each institution's trainer from its own
``client.toml``, the same seeds and turn order, steps through an in-process link instead of the
``SplitSteps`` stream, the plain FedAvg mean instead of the secure sum. Reported: the largest
difference between the deployed and the replayed client and server parts when each round is
replayed from the deployment's previous checkpoint (the secure sum's fixed-point encoding is the
only expected difference) and after a free-running replay of all rounds (those differences
compounded by training), the eval loss of both (the mean over the embedded domains' test sets,
as ``benchmarks/split_training.py``), bytes per step and per
round each way on the split streams as the clients counted them (protobuf framing included),
the secure-sum upload, and the server's wall time per round (the first apart: it includes the
client processes building their models).

    .venv/bin/python benchmarks/split_deployment.py [--rounds 8] [--local-steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from clients import defaults
from clients.client_config import load_client_config
from clients.data import alpaca_example, tokenize
from clients.model_factory import build_default_base
from clients.split.train_task import split_update
from clients.split.trainer import InProcessLink
from clients.synthetic import make_federation
from clients.train_task import LocalTrainer
from clients.trainer import evaluate
from fl_core.round_config import TrainTask
from fl_core.strategies import AggregateInput, FedAvg
from server.checkpoints import load_checkpoint
from server.config import load_server_config
from server.split_service import build_split_service

ENTRY = "import sys; from fl_core.cli import main; sys.exit(main())"
SEED = 7


def fedsec(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", ENTRY, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"no {pattern!r} in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def server_toml(port: int, args: argparse.Namespace, adapter: Path, institutions: int) -> str:
    d = defaults.DEFAULTS
    return f"""[server]
listen = "127.0.0.1:{port}"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
roster = "roster.toml"
state_dir = "state"

[rounds]
count = {args.rounds}
cohort_size = {institutions}
min_clients = {institutions}
ring_bits = 32
stage_timeout_s = 300.0
join_timeout_s = 600.0
seed = {SEED}

[task]
kind = "split"
initial_adapter = "{adapter}"
strategy = "fedavg"
local_steps = {args.local_steps}
lr = {d.recipe.lr}
batch_size = {d.recipe.batch_size}
clip = {2.0 * d.recipe.lr * args.local_steps}
max_weight = {d.records_per_institution}

[split]
client_bottom = {args.client_bottom}
client_top = {args.client_top}
institutions = {institutions}
records = {d.records_per_institution}
max_length = {d.recipe.max_length}
step_timeout_s = 120.0
threads = {args.threads}
"""


def client_toml(client: int, port: int, name: str, args: argparse.Namespace) -> str:
    d = defaults.DEFAULTS
    return f"""[client]
id = {client}
server = "127.0.0.1:{port}"
ca_cert = "../pki/ca.pem"
identity = "identity.key"
roster = "../roster.toml"
give_up_after_s = 600.0

[train]
institutions = {d.institutions}
records = {d.records_per_institution}
threads = {args.threads}

[data]
synthetic = "{name}"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=defaults.ROUNDS)
    parser.add_argument("--local-steps", type=int, default=defaults.LOCAL_STEPS)
    parser.add_argument("--client-bottom", type=int, default=1)
    parser.add_argument("--client-top", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="keep the deployment here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    d = defaults.DEFAULTS
    n = d.institutions
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.out or Path(tmp)).resolve() / "deployment"
        keygen = ["keygen", "--out", str(root), "--clients", str(n)]
        subprocess.run([sys.executable, "-c", ENTRY, *keygen], check=True, capture_output=True)
        fed = make_federation(n, d.records_per_institution)
        names = [i.name for i in fed.institutions]
        configs = {c: root / f"client-{c}" / "client.toml" for c in range(1, n + 1)}
        for c, path in configs.items():
            path.write_text(client_toml(c, 1, names[c - 1], args))
        trainers = {c: LocalTrainer(load_client_config(p)) for c, p in configs.items()}
        adapter = root / "initial-adapter"
        trainers[1].write_initial_adapter(adapter)

        # The deployment.
        (root / "server.toml").write_text(server_toml(0, args, adapter, n))
        began = time.monotonic()
        server = fedsec(["server", "--config", "server.toml"], root, root / "server.log")
        port = int(wait_for(root / "server.log", r"listening on 127\.0\.0\.1:(\d+)", server, 120))
        clients = []
        for c, path in configs.items():
            path.write_text(client_toml(c, port, names[c - 1], args))
            clients.append(
                fedsec(["client", "--config", str(path)], root, path.with_suffix(".log"))
            )
        if server.wait(3600) != 0:
            raise SystemExit((root / "server.log").read_text()[-3000:])
        deployment_s = time.monotonic() - began
        stats = []
        for c, proc in zip(configs, clients, strict=True):
            proc.wait(60)
            lines = configs[c].with_suffix(".log").read_text().splitlines()
            stats.append(json.loads(next(x for x in reversed(lines) if x.startswith("{"))))
        server_log = (root / "server.log").read_text()
        round_s = [float(s) for s in re.findall(r"round \d+ completed in ([\d.]+) s", server_log)]

        # The same rounds in this process, twice: each round from the deployment's checkpoint of
        # the round before (its deviation from the deployment is that round's alone), and
        # free-running from the initial adapter (whose end point is compared by eval loss).
        server_config = load_server_config(root / "server.toml")
        recipe = server_config.task.recipe
        service = build_split_service(server_config)
        middle = service._middle  # the server's model, as the deployment built it
        client_part = middle.split.layout.client
        cohort = list(range(1, n + 1))

        def replay_round(number: int, client: np.ndarray, server: np.ndarray) -> np.ndarray:
            """One round from (client, server); the new client part (middle holds the server's)."""
            train = TrainTask(
                seed=SEED,
                local_steps=args.local_steps,
                learning_rate=recipe.lr_at(number, args.rounds),
                batch_size=recipe.batch_size,
                max_weight=d.records_per_institution,
                layout_fingerprint=client_part.fingerprint(),
            )
            task = service.task(train, d.recipe.max_length)
            middle.set_vector(server)
            middle.begin_round(cohort, args.local_steps, task.limits)
            model = client.astype("<f4").tobytes()
            results = [
                split_update(trainers[c], task, model, InProcessLink(middle, c)) for c in cohort
            ]
            total = sum(r.num_samples * r.delta.astype(np.float64) for r in results)
            weight = float(sum(r.num_samples for r in results))
            released = AggregateInput(np.asarray(total), weight, len(results))
            return FedAvg(client.size).aggregate(client, released).astype(np.float32)

        initial_client, initial_server = middle.split.client_vector(), middle.vector()
        initial = middle.split.layout.join(initial_client, initial_server)
        free_client, free_server = initial_client, initial_server
        synced_client, synced_server = initial_client, initial_server
        in_process_s: list[float] = []
        deviation = {"client_part": 0.0, "server_part": 0.0}
        for number in range(args.rounds):
            drawn = {c: t.batches_drawn for c, t in trainers.items()}
            deployed = load_checkpoint(
                root / "state" / "checkpoints" / f"round-{number:06d}.safetensors"
            )
            assert deployed.server_part is not None
            client = replay_round(number, synced_client, synced_server)
            deviation["client_part"] = max(
                deviation["client_part"], float(np.abs(deployed.global_vector - client).max())
            )
            deviation["server_part"] = max(
                deviation["server_part"],
                float(np.abs(deployed.server_part - middle.vector()).max()),
            )
            synced_client, synced_server = deployed.global_vector, deployed.server_part
            for c, t in trainers.items():
                t.batches_drawn = drawn[c]  # the free run draws the same batches
            t0 = time.monotonic()
            free_client = replay_round(number, free_client, free_server)
            free_server = middle.vector()
            in_process_s.append(time.monotonic() - t0)
        last = load_checkpoint(
            root / "state" / "checkpoints" / f"round-{args.rounds - 1:06d}.safetensors"
        )
        assert last.server_part is not None

        # Eval loss of both, on the embedded domains' test sets.
        _, tok = build_default_base(fed.corpus())
        pad = int(tok.pad_token_id)
        test = {
            name: tokenize([alpaca_example(r) for r in rs], tok, d.recipe.max_length, name)
            for name, rs in fed.test_sets.items()
        }
        lm, layout = middle.split.lm, middle.split.layout

        def loss(vector: np.ndarray) -> float:
            return float(np.mean(list(evaluate(lm, vector, test, pad).values())))

        replayed_loss = loss(layout.join(free_client, free_server))
        drift = {
            "client_part": float(np.abs(last.global_vector - free_client).max()),
            "server_part": float(np.abs(last.server_part - free_server).max()),
        }
        deployed_loss = loss(layout.join(last.global_vector, last.server_part))
        steps = sum(s["split_steps"] for s in stats)
        up = sum(s["split_bytes_up"] for s in stats)
        down = sum(s["split_bytes_down"] for s in stats)
        secure_sum_up = sum(s["bytes_up"] - s["split_bytes_up"] for s in stats)
        record = {
            "benchmark": "split_deployment",
            "institutions": n,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": d.recipe.batch_size,
            "split": {"client_bottom": args.client_bottom, "client_top": args.client_top},
            "transport": "gRPC over TLS on loopback, one process per party",
            "initial_eval_loss": round(loss(initial), 4),
            "eval_loss": {
                "grpc_deployment": round(deployed_loss, 4),
                "in_process_replay": round(replayed_loss, 4),
            },
            # Each round replayed from the deployment's previous checkpoint: the secure sum's
            # fixed-point encoding is the only expected difference.
            "max_abs_difference_per_round": {k: float(f"{v:.3g}") for k, v in deviation.items()},
            # Free-running: those per-round differences, compounded by training (AdamW).
            "max_abs_difference_after_all_rounds": {k: float(f"{v:.3g}") for k, v in drift.items()},
            "bytes": {
                "split_per_step": {"up": round(up / steps), "down": round(down / steps)},
                "split_steps_per_client_per_round": {
                    "up": round(up / args.rounds / n),
                    "down": round(down / args.rounds / n),
                },
                "secure_sum_up_per_client_per_round": round(secure_sum_up / args.rounds / n),
                "client_part_coordinates": client_part.size,
            },
            # Round 0 also waits for every client process to build its model: apart.
            "wall_s_first_round_grpc": round(round_s[0], 2),
            "wall_s_per_round_after_first": {
                "grpc_deployment": round(float(np.mean(round_s[1:] or round_s)), 2),
                "in_process_replay_plain_sum": round(
                    float(np.mean(in_process_s[1:] or in_process_s)), 2
                ),
            },
            "deployment_s_total": round(deployment_s, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

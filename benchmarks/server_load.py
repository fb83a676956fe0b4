"""Load test of the real deployment: N client processes through `fedsec server` on loopback.

No training: each client submits the ``random`` task's update (d coordinates, 32-bit ring),
so the figures are those of the transport and the secure-aggregation protocol alone. Prints
one JSON line:

- ``round_s``: server-side wall time of the round, from sending RoundStart to the completed
  aggregate (from the server's own record; process start-up and admission are excluded);
- ``wire_vs_payload``: per client, the gRPC message bytes it sent and received per round
  (every frame of every RPC: admission, polls, uploads, downloads) over the packed size of its
  masked input (``ring_bits * d / 8``). TLS records and HTTP/2 frame headers add about 0.2 %
  on top (9 + ~22 bytes per 16 KiB) and are not counted;
- ``transport_overhead``: ``round_s`` over the wall time of the same round (same cohort, same
  inputs, the same codec built from the same server config) run in one process by
  :func:`secagg.simulate.simulate_round`, encoding included.

With ``--dp-epsilon E`` the server config gains ``[dp] epsilon = E``: every client clips,
rotates, rounds and adds its share of the Skellam noise (the round core's DP codec) before
masking, in the deployment and in the in-process round alike.

Usage: ``.venv/bin/python benchmarks/server_load.py [--clients 20] [--dim 1000000]
[--dp-epsilon 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clients.transport import random_input, random_update
from secagg.packing import packed_size
from secagg.params import SessionShape, session_shape
from secagg.protocol import RoundParams
from secagg.ring import Ring
from secagg.simulate import simulate_round
from server.config import load_server_config
from server.global_model import GlobalModel
from server.store import Store

ENTRY = "import sys; from fl_core.cli import main; sys.exit(main())"
RING_BITS = 32
SEED = 11
#: Two rounds: the first includes each process's one-off warm-up (lazy imports, first AES and
#: TLS use); the figures are those of the second, a deployment's steady state.
ROUNDS = 2


def _server_toml(clients: int, dim: int, threshold: int, dp_epsilon: float | None) -> str:
    return f"""[server]
listen = "127.0.0.1:0"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
roster = "roster.toml"
state_dir = "state"

[rounds]
count = {ROUNDS}
cohort_size = {clients}
min_clients = {clients}
threshold = {threshold}
ring_bits = {RING_BITS}
stage_timeout_s = 300.0
join_timeout_s = 300.0
seed = {SEED}

[task]
kind = "random"
dim = {dim}
""" + (f"\n[dp]\nepsilon = {dp_epsilon}\n" if dp_epsilon is not None else "")


def _client_toml(client_id: int, port: int) -> str:
    return f"""[client]
id = {client_id}
server = "127.0.0.1:{port}"
ca_cert = "../pki/ca.pem"
identity = "identity.key"
roster = "../roster.toml"
"""


def _wait_port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def run_deployment(
    root: Path, clients: int, dim: int, threshold: int, dp_epsilon: float | None
) -> dict[str, object]:
    keygen = ["keygen", "--out", str(root), "--clients", str(clients), "--port", "1"]
    subprocess.run(
        [sys.executable, "-c", ENTRY, *keygen, "--task", "random"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (root / "server.toml").write_text(_server_toml(clients, dim, threshold, dp_epsilon))
    server_out = root / "server.out"
    with server_out.open("wb") as out, (root / "server.log").open("wb") as err:
        server = subprocess.Popen(
            [sys.executable, "-c", ENTRY, "server", "--config", "server.toml"],
            cwd=root,
            stdout=out,
            stderr=err,
        )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = _wait_port(server_out, server)
        for c in range(1, clients + 1):
            config = root / f"client-{c}" / "client.toml"
            config.write_text(_client_toml(c, port))
            with (
                (root / f"client-{c}.out").open("wb") as out,
                (root / f"client-{c}.log").open("wb") as err,
            ):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", ENTRY, "client", "--config", str(config)],
                        cwd=root,
                        stdout=out,
                        stderr=err,
                    )
                )
        if server.wait(timeout=900) != 0:
            raise RuntimeError(f"server failed: {(root / 'server.log').read_text()[-2000:]}")
        stats = []
        for c, proc in enumerate(procs, start=1):
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"client {c} failed: {(root / f'client-{c}.log').read_text()}")
            stats.append(
                json.loads((root / f"client-{c}.out").read_text().strip().splitlines()[-1])
            )
    finally:
        for proc in [*procs, server]:
            if proc.poll() is None:
                proc.kill()
    store = Store(root / "state" / "state.db", readonly=True)
    records = store.rounds()
    record = records[-1]
    stages = {s.stage: round(s.seconds, 3) for s in store.stages(record.attempt)}
    store.close()
    if len(records) != ROUNDS or any(r.ended_at is None or r.contributors is None for r in records):
        raise RuntimeError(f"rounds did not all complete: {[r.reason for r in records]}")
    assert record.ended_at is not None and record.contributors is not None
    return {
        "first_round_s": (records[0].ended_at or 0.0) - records[0].started_at,
        "round_s": record.ended_at - record.started_at,
        "stages": stages,
        "contributors": list(record.contributors),
        "bytes_per_client": [s["bytes_up"] + s["bytes_down"] for s in stats],
    }


def run_simulation(server_toml: Path, clients: int, threshold: int) -> tuple[float, int]:
    """The same round in one process, from the deployment's own server config (so the same
    codec: plain quantisation, or the DP codec); like the deployment, it includes drawing and
    encoding the inputs."""
    cohort = list(range(1, clients + 1))
    model = GlobalModel(load_server_config(server_toml))
    shape = SessionShape(threshold, None, threshold)
    config, _ = model.round_config(ROUNDS - 1, os.urandom(32), tuple(cohort), shape)
    codec = config.masking.codec
    began = time.perf_counter()
    if codec.dp is None:
        inputs = {c: random_input(config, c) for c in cohort}
    else:
        inputs = {c: codec.encode(random_update(config, c), 1).vector for c in cohort}
    params = RoundParams(
        os.urandom(32), codec.ring_bits, codec.encoded_dim, threshold, tuple(cohort)
    )
    result = simulate_round(params, inputs, record_masked_inputs=False)
    seconds = time.perf_counter() - began
    ring = Ring(codec.ring_bits)
    expected = ring.zeros(codec.encoded_dim)
    for vector in inputs.values():
        expected = ring.reduce(expected + vector)
    if not np.array_equal(result.result.sum, expected):
        raise RuntimeError("simulation sum is wrong")
    return seconds, codec.encoded_dim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument(
        "--dp-epsilon", type=float, default=None, help="distributed DP at this epsilon ([dp])"
    )
    args = parser.parse_args()
    threshold = session_shape(args.clients).threshold
    with tempfile.TemporaryDirectory(prefix="fedsec-load-") as tmp:
        deployed = run_deployment(Path(tmp), args.clients, args.dim, threshold, args.dp_epsilon)
        simulated_s, encoded_dim = run_simulation(
            Path(tmp) / "server.toml", args.clients, threshold
        )
    payload = packed_size(RING_BITS, encoded_dim)
    per_client = deployed["bytes_per_client"]
    assert isinstance(per_client, list)
    round_s = float(deployed["round_s"])  # type: ignore[arg-type]
    print(
        json.dumps(
            {
                "clients": args.clients,
                "dim": args.dim,
                "ring_bits": RING_BITS,
                "dp_epsilon": args.dp_epsilon,
                "encoded_dim": encoded_dim,
                "threshold": threshold,
                "round_s": round(round_s, 3),
                "first_round_s": round(float(deployed["first_round_s"]), 3),  # type: ignore[arg-type]
                "stage_s": deployed["stages"],
                "simulation_s": round(simulated_s, 3),
                "transport_overhead": round(round_s / simulated_s, 3),
                "payload_bytes": payload,
                "wire_bytes_per_client_round_max": max(per_client) // ROUNDS,
                "wire_vs_payload": round(max(per_client) / ROUNDS / payload, 4),
                "cpu_count": os.cpu_count(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""fedsec on Flower's simulation engine (Ray backend) at scale, beside fedsec's own simulation.

Three parts per n, each in a child process (Ray starts and stops cleanly; peak memory is per
run):

* ``flower``: one round of SecAgg+ over n virtual clients (Flower SuperNodes simulated by the Ray
  backend, each running fedsec's mod in a ClientApp) with a d-dimensional update, driven by
  fedsec's workflow in the ServerApp. Per stage: the server's own compute (``close_stage``) and
  the stage's wall time; the server's peak memory (Python/numpy allocations, ``tracemalloc``,
  while the workflow runs) and the process's peak RSS (the engine's state included).
* ``engine_floor``: Flower's engine alone, the same n and number of exchanges (7: join, setup
  and the five SecAgg+ stages), each message and reply carrying ``--payload`` bytes, answered by
  a mod that does nothing. What no ClientApp or workflow on this engine can go below.
* ``fedsec_inprocess``: the same n, d through :class:`secagg.simulate.Simulation` in one process
  (every message through its canonical bytes, no Flower).

Flower's engine: ``os.cpu_count() / --cpus-per-client`` ClientApp actors (default one per core),
no Ray dashboard.

    .venv/bin/python benchmarks/flower_scale.py --clients 100 1000 --dim 1000

Prints one JSON line; ``{"skipped": ...}`` when Flower's simulation engine is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import numpy as np

try:
    import flwr
    import ray  # noqa: F401
except ImportError:
    print(json.dumps({"benchmark": "flower_scale", "skipped": "Flower's simulation engine is "
                      "not installed: pip install 'fedsec[flower]'"}))  # fmt: skip
    raise SystemExit(0) from None

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_core.federation import FederationConfig, SecAggSettings
from fl_core.flower.mod import ClientCredentials, FedsecMod
from fl_core.flower.workflow import FedsecWorkflow
from secagg.keys import Identity, Roster
from secagg.params import session_shape
from secagg.protocol import ClientPolicy, RoundParams
from secagg.ring import Ring
from secagg.simulate import Simulation


def _apps(n: int, d: int, out: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    """The two apps; identities travel to the Ray workers as raw private bytes."""
    raw = {u: Identity.generate().private_bytes() for u in range(1, n + 1)}
    public = {u: Identity.from_private_bytes(k).public_bytes for u, k in raw.items()}
    cache: dict[int, ClientCredentials] = {}

    def credentials(context: Context) -> ClientCredentials:
        u = int(context.node_config["partition-id"]) + 1
        if u not in cache:
            cache[u] = ClientCredentials(u, Identity.from_private_bytes(raw[u]), Roster(public))
        return cache[u]

    client = ClientApp(mods=[FedsecMod(credentials, ClientPolicy())])

    @client.train()  # type: ignore[untyped-decorator, unused-ignore]  # no flwr: Any
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        rng = np.random.default_rng(int(context.node_config["partition-id"]))
        update = rng.uniform(-0.5, 0.5, d).astype(np.float32)
        content = RecordDict(
            {
                "arrays": ArrayRecord({"x": Array(arrays["x"].numpy() + update)}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(content, reply_to=msg)

    server = ServerApp()

    @server.main()  # type: ignore[untyped-decorator, unused-ignore]  # no flwr: Any
    def main(grid: Grid, context: Context) -> None:
        names = tuple(f"c{u:05d}" for u in range(1, n + 1))
        config = FederationConfig(clients=names, rounds=1, secagg=SecAggSettings(clip=1.0))
        workflow = FedsecWorkflow(config, Roster(public), max_samples=1, timeout=None)
        initial = ArrayRecord({"x": Array(np.zeros(d, np.float32))})
        tracemalloc.start()
        begin = time.perf_counter()
        result = workflow.start(grid, initial, node_wait_s=1800)
        out["workflow_s"] = time.perf_counter() - begin
        out["server_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        record = result.rounds[0]
        out.update(
            contributors=len(record.contributors),
            aborted=record.aborted,
            stage_s=record.stage_s,
            server_s=record.server_s,
            upload_bytes_per_client=float(np.mean(list(record.upload_bytes.values()) or [0])),
        )

    return server, client


def _backend_config(cpus_per_client: float) -> dict[str, Any]:
    """Ray backend: ``os.cpu_count() / cpus_per_client`` ClientApp actors, no dashboard."""
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False},
    }


def run_flower(n: int, d: int, cpus_per_client: float) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    out: dict[str, Any] = {}
    server, client = _apps(n, d, out)
    begin = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n,
        backend_config=_backend_config(cpus_per_client),
    )
    out["total_s"] = time.perf_counter() - begin
    out["process_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


#: Message exchanges in one fedsec SecAgg+ round on Flower: join, setup (answered with the seed
#: commitment), advertise keys, share keys, masked input, consistency check, unmask.
FEDSEC_EXCHANGES = 7


def _echo_apps(n: int, payload: int, out: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    """Flower's engine alone: the same number of exchanges of n messages as a fedsec round,
    each message and reply carrying ``payload`` bytes, answered by a mod that does nothing."""

    def echo(msg: Message, ctxt: Context, call_next: Any) -> Message:
        body = ConfigRecord({"payload": bytes(payload)})
        return Message(RecordDict({"echo": body}), reply_to=msg)

    client = ClientApp(mods=[echo])

    @client.train()  # type: ignore[untyped-decorator, unused-ignore]  # no flwr: Any
    def train(msg: Message, context: Context) -> Message:  # Flower needs one; echo answers
        raise RuntimeError("the echo mod answers every message")

    server = ServerApp()

    @server.main()  # type: ignore[untyped-decorator, unused-ignore]  # no flwr: Any
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < n:
            time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
        walls = []
        for i in range(FEDSEC_EXCHANGES):
            messages = [
                Message(RecordDict({"echo": ConfigRecord({"payload": bytes(payload)})}),
                        dst_node_id=node, message_type="train", group_id=str(i))
                for node in nodes
            ]  # fmt: skip
            begin = time.perf_counter()
            replies = list(grid.send_and_receive(messages))
            walls.append(time.perf_counter() - begin)
            if len(replies) != n or any(r.has_error() for r in replies):
                errors = [r.error.reason for r in replies if r.has_error()][:1]
                raise RuntimeError(f"exchange {i}: {len(replies)} replies from {n} nodes {errors}")
        out.update(exchange_s=walls, exchanges_s=sum(walls))

    return server, client


def run_engine_floor(n: int, payload: int, cpus_per_client: float) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    out: dict[str, Any] = {"payload_bytes": payload}
    server, client = _echo_apps(n, payload, out)
    begin = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=n,
                   backend_config=_backend_config(cpus_per_client))  # fmt: skip
    out["total_s"] = time.perf_counter() - begin
    return out


def run_inprocess(n: int, d: int) -> dict[str, Any]:
    shape = session_shape(n, 0.05, 0.05, sparse=True)
    params = RoundParams(os.urandom(32), 32, d, shape.threshold, tuple(range(1, n + 1)),
                         shape.neighbours, shape.quorum)  # fmt: skip
    ring = Ring(32)
    rng = np.random.default_rng(0)
    inputs = {u: ring.from_signed(rng.integers(-1000, 1000, d)) for u in params.cohort}
    sim = Simulation(params, inputs, record_masked_inputs=False)
    tracemalloc.start()
    begin = time.perf_counter()
    result = sim.run()
    total = time.perf_counter() - begin
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {
        "total_s": total,
        "stage_s": result.stage_seconds,  # includes every client's work, run in turn
        "server_s": result.server_close_seconds,
        "peak_mib_all_parties": peak,  # every client and the server share this process
        "contributors": len(result.result.contributors),
        "k": shape.neighbours,
        "t": shape.threshold,
    }


PARTS = ("flower", "engine_floor", "fedsec_inprocess")


def one(part: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    if part == "flower":
        return run_flower(n, args.dim, args.cpus_per_client)
    if part == "engine_floor":
        return run_engine_floor(n, args.payload, args.cpus_per_client)
    return run_inprocess(n, args.dim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cpus-per-client", type=float, default=1.0,
                        help="Ray CPUs per ClientApp actor (actors = cores / this)")  # fmt: skip
    parser.add_argument("--payload", type=int, default=2048,
                        help="engine_floor: bytes in each message and reply")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per n and part")
    parser.add_argument("--one", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(n < 3 for n in args.clients) or args.dim < 1 or args.payload < 0:
        print("error: --clients must be >= 3, --dim >= 1 and --payload >= 0", file=sys.stderr)
        return 2
    if args.cpus_per_client <= 0:
        print("error: --cpus-per-client must be > 0", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(one(args.one, args.clients[0], args)))
        return 0
    results = []
    for n in args.clients:
        result: dict[str, Any] = {"n": n, "d": args.dim}
        for part in args.parts:
            command = [sys.executable, __file__, "--one", part, "--clients", str(n),
                       "--dim", str(args.dim), "--payload", str(args.payload),
                       "--cpus-per-client", str(args.cpus_per_client)]  # fmt: skip
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                result[part] = {"error": f"did not finish in {args.timeout} s"}
                continue
            if run.returncode != 0:
                result[part] = {"error": run.stderr.strip()[-600:]}
                continue
            result[part] = json.loads(run.stdout.strip().splitlines()[-1])
        results.append(result)
    print(json.dumps({"benchmark": "flower_scale", "flwr": flwr.__version__, "cpus": os.cpu_count(),
                      "cpus_per_client": args.cpus_per_client, "results": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

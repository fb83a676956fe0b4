"""Flower's own SecAgg+ beside fedsec's, both driven through Flower's Message API in one process.

Flower side: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy FedAvg and
a ``ClientApp`` whose mod is ``secaggplus_mod``. fedsec side: ``FedsecWorkflow`` and a
``ClientApp`` with ``FedsecMod``. Both run over the same in-process Grid
(:class:`fl_core.flower.local_grid.LocalGrid`, no Ray), which times every ClientApp call, so
each stage splits into client time (the ClientApps' calls, mean per client) and server time (the
rest of the stage: the workflow's own work). Same n, d, SecAgg+ degree k and threshold t (fedsec's
:func:`secagg.params.session_shape`; Flower's ``num_shares`` = k + 1, its neighbours and itself),
same dropout (clients that stop answering after sharing their keys). The clients' update is a
fixed random vector (no training), so what is timed is secure aggregation.

Upload bytes: every byte a client's replies carry in their records (bytes fields by length,
numbers as 8 bytes), the same count for both.

    .venv/bin/python benchmarks/flower_compare.py          # n {10, 100} x d {1e5, 1e6} x dropout
    .venv/bin/python benchmarks/flower_compare.py --quick  # {0, 0.1}; --quick: a subset

Prints one JSON line; ``{"skipped": ...}`` when Flower is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

try:
    import flwr
except ImportError:
    print(json.dumps({"benchmark": "flower_compare", "skipped": "flwr not installed: "
                      "pip install 'fedsec[flower]'"}))  # fmt: skip
    raise SystemExit(0) from None

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_core.federation import FederationConfig, SecAggSettings
from fl_core.flower.local_grid import LocalGrid
from fl_core.flower.mod import ClientCredentials, FedsecMod
from fl_core.flower.plan import RECORD
from fl_core.flower.workflow import FedsecWorkflow
from secagg.keys import Identity, Roster
from secagg.messages import decode_message
from secagg.params import session_shape
from secagg.protocol import ClientPolicy

NODE_BASE = 1_000_000


def _record_bytes(content: RecordDict) -> int:
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                total += len(item) if isinstance(item, bytes | str) else 8
    return total


class TimingGrid(LocalGrid):
    """Times each ClientApp call and labels it with the stage its message belongs to; the rest
    of a stage, less the grid's message copies (its stand-in for the network), is server time."""

    def __init__(
        self,
        app: ClientApp,
        nodes: dict[int, dict[str, Any]],
        label: Callable[[Message], str],
        drop_at: str,
        dropped: set[int],
    ) -> None:
        super().__init__(self._timed, nodes)
        self.inner = app
        self.label = label
        self.drop_at = drop_at
        self.dropped = dropped
        self.client_s: dict[str, float] = defaultdict(float)
        self.copies_s: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stage_wall: dict[str, float] = defaultdict(float)
        self.upload: dict[int, int] = defaultdict(int)
        self._stage = ""
        self._since = 0.0

    def _timed(self, message: Message, context: Context) -> Message:
        begin = time.perf_counter()
        try:
            return self.inner(message, context)
        finally:
            self.client_s[self._stage] += time.perf_counter() - begin
            self.calls[self._stage] += 1

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        self._close()
        self._stage, self._since = self.label(messages[0]), time.perf_counter()
        if self._stage == self.drop_at:
            self.silent |= self.dropped
        copied = self.copy_s
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.copies_s[self._stage] += self.copy_s - copied
        for reply in replies:
            if reply.has_content():
                self.upload[reply.metadata.src_node_id] += _record_bytes(reply.content)
        return replies

    def _close(self) -> None:
        if self._stage:  # the previous stage ends where the next one's messages go out
            self.stage_wall[self._stage] += time.perf_counter() - self._since
            self._stage = ""

    def summary(self) -> dict[str, Any]:
        self._close()
        stages = {}
        for stage, wall in self.stage_wall.items():
            stages[stage] = {
                "client_s_per_client": self.client_s[stage] / max(self.calls[stage], 1),
                "server_s": max(wall - self.client_s[stage] - self.copies_s[stage], 0.0),
            }
        uploads = [b for n, b in self.upload.items() if n not in self.dropped]
        return {"stages": stages, "upload_bytes_per_client": float(np.mean(uploads))}


# --- Flower's SecAgg+ ----------------------------------------------------------------------


def run_flower(n: int, d: int, k: int, t: int, dropped: set[int]) -> dict[str, Any]:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    update = np.random.default_rng(0).uniform(-1, 1, d).astype(np.float32)

    # Without flwr, NumPyClient is Any (a subclass of Any is an error); with it, it is typed.
    class Client(NumPyClient):  # type: ignore[misc, unused-ignore]
        def fit(self, parameters: Any, config: Any) -> Any:
            return [update], 10, {}

    app = ClientApp(client_fn=lambda _ctx: Client().to_client(), mods=[secaggplus_mod])

    def label(m: Message) -> str:
        return str(m.content.config_records[RECORD_KEY_CONFIGS]["stage"])

    nodes: dict[int, dict[str, Any]] = {NODE_BASE + u: {} for u in range(1, n + 1)}
    grid = TimingGrid(app, nodes, label, "collect_masked_vectors",
                      {NODE_BASE + u for u in dropped})  # fmt: skip
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n - len(dropped),
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32)]),
    )
    context = LegacyContext(Context(1, 1, {}, RecordDict(), {}), ServerConfig(num_rounds=1),
                            strategy)  # fmt: skip
    shares = k + 1 if (k + 1) % 2 == 1 or k + 1 == n else k + 2
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=t, max_weight=1000.0
        )
    )
    begin = time.perf_counter()
    workflow(grid, context)
    total = time.perf_counter() - begin
    return {"total_s": total, "num_shares": shares, **grid.summary()}


# --- fedsec ---------------------------------------------------------------------------------


def run_fedsec(n: int, d: int, dropped: set[int]) -> dict[str, Any]:
    identities = {u: Identity.generate() for u in range(1, n + 1)}
    roster = Roster({u: i.public_bytes for u, i in identities.items()})
    creds = {NODE_BASE + u: ClientCredentials(u, i, roster) for u, i in identities.items()}
    policy = ClientPolicy()
    app = ClientApp(mods=[FedsecMod(lambda c: creds[c.node_id], policy)])
    update = np.random.default_rng(0).uniform(-1, 1, d).astype(np.float32)

    @app.train()  # type: ignore[untyped-decorator, unused-ignore]  # no flwr: Any
    def train(msg: Message, ctxt: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        out = ArrayRecord({"x": Array(arrays["x"].numpy() + update)})
        content = RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    def label(m: Message) -> str:
        record: ConfigRecord = m.content.config_records[RECORD]
        stage = str(record["stage"])
        if stage != "secagg":
            return stage
        payload = record["payload"]
        assert isinstance(payload, bytes)
        return type(decode_message(payload)).__name__

    nodes: dict[int, dict[str, Any]] = {node: {} for node in creds}
    grid = TimingGrid(app, nodes, label, "SharesDelivery", {NODE_BASE + u for u in dropped})
    names = tuple(f"c{u:05d}" for u in range(1, n + 1))
    config = FederationConfig(clients=names, rounds=1, secagg=SecAggSettings(clip=1.0))
    workflow = FedsecWorkflow(config, roster, max_samples=10)
    begin = time.perf_counter()
    result = workflow.start(grid, ArrayRecord({"x": Array(np.zeros(d, np.float32))}))
    total = time.perf_counter() - begin
    record = result.rounds[0]
    if record.aborted:
        raise RuntimeError(f"fedsec round aborted: {record.aborted}")
    return {"total_s": total, "contributors": len(record.contributors), **grid.summary()}


# Flower's stages -> fedsec's stages doing the same job (named by what the server sends).
# masking: Flower's collect_masked_vectors also runs the (trivial) fit and the quantisation,
# which fedsec does at setup; unmask: fedsec's includes its consistency check (a round trip
# Flower does not have). The all_stages ratios compare everything each side does.
PHASES = {
    "masking": (["collect_masked_vectors"], ["SharesDelivery"]),
    "unmask": (["unmask"], ["ConsistencyRequest", "UnmaskRequest"]),
}


def _phase(stages: dict[str, Any], names: list[str], what: str) -> float:
    return float(sum(stages.get(s, {}).get(what, 0.0) for s in names))


def compare(n: int, d: int, dropout: float) -> dict[str, Any]:
    shape = session_shape(n, 0.05, 0.05, sparse=True)
    k = shape.neighbours if shape.neighbours is not None else n - 1
    dropped = set(range(1, round(dropout * n) + 1))
    fedsec = run_fedsec(n, d, dropped)
    flower = run_flower(n, d, k, shape.threshold, dropped)
    ratios: dict[str, float | None] = {}
    for phase in ("masking", "unmask"):
        fl_names, fs_names = PHASES[phase]
        for what in ("client_s_per_client", "server_s"):
            a = _phase(flower["stages"], fl_names, what)
            b = _phase(fedsec["stages"], fs_names, what)
            ratios[f"{phase}_{what}"] = a / b if b > 0 else None
    for what in ("client_s_per_client", "server_s"):
        a = sum(v[what] for v in flower["stages"].values())
        b = sum(v[what] for v in fedsec["stages"].values())
        ratios[f"all_stages_{what}"] = a / b if b > 0 else None
    ratios["upload_bytes"] = flower["upload_bytes_per_client"] / fedsec["upload_bytes_per_client"]
    ratios["total_s"] = flower["total_s"] / fedsec["total_s"]
    return {"n": n, "d": d, "dropout": dropout, "k": k, "t": shape.threshold,
            "flower": flower, "fedsec": fedsec, "flower_over_fedsec": ratios}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=10 and 100 at d=1e5, dropout 0.1")
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--dropouts", type=float, nargs="+", default=None)
    args = parser.parse_args(argv)
    clients = args.clients or [10, 100]
    dims = args.dims or ([100_000] if args.quick else [100_000, 1_000_000])
    dropouts = args.dropouts or ([0.1] if args.quick else [0.0, 0.1])
    if any(n < 3 for n in clients) or any(d < 1 for d in dims):
        print("error: --clients must be >= 3 and --dims >= 1", file=sys.stderr)
        return 2
    results = [compare(n, d, p) for n in clients for d in dims for p in dropouts]
    summary = {
        key: [r["flower_over_fedsec"][key] for r in results]
        for key in results[0]["flower_over_fedsec"]
    }
    print(json.dumps({"benchmark": "flower_compare", "flwr": flwr.__version__,
                      "cases": [{k: r[k] for k in ("n", "d", "dropout")} for r in results],
                      "flower_over_fedsec": summary, "results": results}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

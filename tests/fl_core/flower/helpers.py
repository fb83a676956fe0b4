"""A small Flower federation in one process: ClientApps with fedsec's mod behind a LocalGrid.

Imported by the tests that need Flower, after their ``pytest.importorskip("flwr")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_core.federation import DpSettings, FederationConfig, SecAggSettings
from fl_core.flower.mod import ClientCredentials, FedsecMod
from secagg.keys import Identity, Roster
from secagg.protocol import ClientPolicy

#: Why a Flower test skips where the extra is not installed.
NEEDS_FLWR = "needs Flower, the optional extra: pip install 'fedsec[flower]'"

#: Flower node ids are arbitrary 64-bit labels; fedsec ids are the roster's 1..N.
NODE_BASE = 7_000_000_000


@dataclass
class FlowerFederation:
    config: FederationConfig
    roster: Roster
    identities: dict[int, Identity]
    nodes: dict[int, int]  # Flower node id -> fedsec client id
    app: ClientApp
    policy: ClientPolicy
    #: What each client's train function adds to every coordinate (its "update").
    updates: dict[int, float]
    samples: dict[int, int]
    #: Clients whose train function raises; every client id whose train function ran.
    failing: set[int]
    trained: list[int]

    def initial(self) -> ArrayRecord:
        return ArrayRecord(
            {"w": Array(np.zeros((3, 4), np.float32)), "b": Array(np.ones(5, np.float32))}
        )

    def expected_mean(self, contributors: tuple[int, ...]) -> float:
        weights = [self.samples[u] for u in contributors]
        deltas = [self.updates[u] for u in contributors]
        return float(np.dot(weights, deltas) / sum(weights))


def make_federation(
    n: int = 4,
    rounds: int = 1,
    credentials: Callable[[Context], ClientCredentials] | None = None,
    policy: ClientPolicy | None = None,
    dp: DpSettings | None = None,
) -> FlowerFederation:
    names = tuple(f"inst-{i}" for i in range(n))
    identities = {u: Identity.generate() for u in range(1, n + 1)}
    roster = Roster({u: i.public_bytes for u, i in identities.items()})
    nodes = {NODE_BASE + 17 * u: u for u in identities}
    creds = {node: ClientCredentials(u, identities[u], roster) for node, u in nodes.items()}
    policy = policy or ClientPolicy(corrupt_fraction=0.05, dropout_fraction=0.05)
    failing: set[int] = set()
    trained: list[int] = []
    updates = {u: 0.001 * u for u in identities}
    samples = {u: 10 * u for u in identities}
    app = ClientApp(mods=[FedsecMod(credentials or (lambda c: creds[c.node_id]), policy)])

    @app.train()
    def train(msg: Message, ctxt: Context) -> Message:
        u = nodes[ctxt.node_id]
        trained.append(u)
        if u in failing:
            raise RuntimeError("out of memory")
        arrays = msg.content.array_records["arrays"]
        out = {k: Array((a.numpy() + updates[u]).astype(np.float32)) for k, a in arrays.items()}
        content = RecordDict(
            {"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": samples[u]})}
        )
        return Message(content, reply_to=msg)

    config = FederationConfig(clients=names, rounds=rounds, secagg=SecAggSettings(clip=0.05), dp=dp)
    return FlowerFederation(
        config, roster, identities, nodes, app, policy, updates, samples, failing, trained
    )

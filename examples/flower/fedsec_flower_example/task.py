"""What both apps share: the settings, the workload (model, data, trainer) and the identities.

The workload is exactly ``fedsec simulate``'s (:func:`clients.simulation.prepare` of the same
:class:`~clients.workload.SimulationSpec`): the embedded tiny Llama with its LoRA adapter and
the synthetic non-IID institutions, so a Flower run and ``fedsec simulate`` of the same seed train
the same clients on the same data from the same initial adapter. Every process that needs it
builds it once (deterministically, from the seed): the ServerApp for the initial adapter and
evaluation, each Flower worker for local training.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from fl_core import recipe as recipes
from fl_core.flower.mod import (
    NODE_CLIENT_ID,
    ClientCredentials,
    node_config_credentials,
)
from secagg.keys import Identity
from wire.credentials import (
    RosterEntry,
    load_identity,
    load_roster,
    save_identity,
    write_roster,
)

if TYPE_CHECKING:
    from clients.simulation import TorchTrainer
    from clients.workload import SimulationSpec
    from fl_core.federation import Federation

#: The one array the apps exchange: the adapter's trainable vector (LoRA A and B, flattened in
#: fedsec's fixed named order; ``clients.trainer.LoraModel`` maps it to and from the PEFT tensors).
ADAPTER = "lora"
ROSTER_FILE = "roster.toml"


@dataclass(frozen=True)
class ExampleSettings:
    """The app's run config (``[tool.flwr.app.config]`` in pyproject.toml, or ``--run-config``)."""

    institutions: int = 4
    rounds: int = 3
    records: int = 160
    eval_records: int = 48
    local_steps: int = 10
    seed: int = 0
    keys_dir: str = "keys"
    out_dir: str = ""  # where the ServerApp writes flower_result.json ("": nowhere)

    @classmethod
    def from_run_config(cls, config: Mapping[str, object]) -> ExampleSettings:
        defaults = cls()
        out = defaults
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                kind = type(getattr(defaults, f.name))  # int or str
                out = replace(out, **{f.name: kind(config[key])})
        return out

    def spec(self) -> SimulationSpec:
        from clients.workload import SimulationSpec

        recipe = replace(recipes.EMBEDDED, local_steps=self.local_steps)
        return SimulationSpec(
            institutions=self.institutions,
            rounds=self.rounds,
            recipe=recipe,
            seed=self.seed,
            records=self.records,
            eval_records=self.eval_records,
            generate=0,
        )


@functools.lru_cache(maxsize=2)
def workload(settings: ExampleSettings) -> tuple[Federation, TorchTrainer]:
    """``fedsec simulate``'s federation and trainer for these settings (built once a process).
    Imported here: torch and transformers load only in a process that trains or evaluates
    (Flower's deployment engine starts a process per message)."""
    from clients.simulation import prepare

    return prepare(settings.spec())


def write_keys(settings: ExampleSettings) -> Path:
    """A fresh Ed25519 identity per institution (ids 1..N: the sorted institution names) and
    the roster of their public keys, under ``keys_dir``. Keys come from ``os.urandom``."""
    out = Path(settings.keys_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for client_id in range(1, settings.institutions + 1):
        identity = Identity.generate()
        save_identity(identity, out / f"institution-{client_id}.key")
        entries.append(RosterEntry(client_id, f"institution-{client_id}", identity.public_bytes))
    write_roster(entries, out / ROSTER_FILE)
    return out


def node_credentials(context: Context, settings: ExampleSettings) -> ClientCredentials:
    """Deployment: the SuperNode's ``--node-config`` names the identity (see the README).
    Simulation: node ``partition-id`` p is institution p + 1, its key under ``keys_dir``."""
    node_config = context.node_config
    if NODE_CLIENT_ID in node_config:
        return node_config_credentials(context)
    client_id = int(node_config["partition-id"]) + 1
    keys = Path(settings.keys_dir)
    roster, _ = load_roster(keys / ROSTER_FILE)
    identity = load_identity(keys / f"institution-{client_id}.key")
    return ClientCredentials(client_id, identity, roster)

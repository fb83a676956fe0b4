"""fedsec's secure aggregation inside a Flower app (the optional extra ``fedsec[flower]``).

Two swaps replace Flower's SecAgg+ (``secaggplus_mod`` / ``SecAggPlusWorkflow``):

* client: ``ClientApp(mods=[FedsecMod()])`` — :class:`fl_core.flower.mod.FedsecMod` runs
  fedsec's :class:`~secagg.protocol.ClientSession` on the messages the workflow sends, and calls
  the app's own ``@app.train()`` function once per round to obtain the trained arrays;
* server: ``FedsecWorkflow(config, roster, ...).start(grid, initial_arrays)`` in the
  ``ServerApp``'s main — :class:`fl_core.flower.workflow.FedsecWorkflow` runs fedsec's
  :class:`~secagg.protocol.ServerSession`, the round plan and codec of :mod:`fl_core.round` and
  the strategy of :mod:`fl_core.strategies`, exactly as ``fedsec simulate`` does in-process.

What Flower provides and what it does not: Flower moves the messages (simulation engine or
SuperLink/SuperNodes) and, with SuperNode authentication on, tells the workflow which node a
reply came from. Flower node ids are *not* identities to fedsec: every client proves which
roster entry it is by signing the workflow's join challenge with its Ed25519 identity key, and
every key advert and survivor-set signature is verified against fedsec's roster, exactly as
over fedsec's own gRPC transport. A node that lies about who it is (or, without SuperNode
authentication, a rogue node that pushes replies under another node's id) can make a round
abort — nothing is released then — but cannot insert a key, a neighbour or a survivor set.

Flower is imported only when the mod or the workflow is used; without it they raise
:class:`FlowerNotInstalled` with the one line that fixes it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fl_core.errors import FLError

if TYPE_CHECKING:
    from fl_core.flower.mod import FedsecMod
    from fl_core.flower.workflow import FedsecWorkflow

__all__ = ["FedsecMod", "FedsecWorkflow", "FlowerNotInstalled", "require_flwr"]

#: The Flower releases this integration is tested with (pyproject's ``flower`` extra).
FLWR_RANGE = ">=1.42,<1.43"


class FlowerNotInstalled(FLError, ImportError):
    """Flower is not installed in this environment."""


def require_flwr() -> None:
    """Raise :class:`FlowerNotInstalled` (one actionable line) when ``flwr`` is missing."""
    try:
        importlib.import_module("flwr")
    except ImportError:
        raise FlowerNotInstalled(
            f"the Flower integration needs flwr{FLWR_RANGE}: pip install 'fedsec[flower]'"
        ) from None


def __getattr__(name: str) -> Any:
    if name in ("FedsecMod", "FedsecWorkflow"):
        require_flwr()
        module = importlib.import_module(
            "fl_core.flower.mod" if name == "FedsecMod" else "fl_core.flower.workflow"
        )
        return getattr(module, name)
    raise AttributeError(f"module 'fl_core.flower' has no attribute {name!r}")

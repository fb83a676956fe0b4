"""An institution's own account of the DP releases its noised inputs went into.

The coordinator calibrates the noise, but an institution need not trust it to do so honestly:
before training for a round, the client computes what the round's release would cost it — the
release's privacy event at the round's DP parameters with the fewest contributors the session
enforces (``RoundParams.min_survivors``), composed with every release it already took part in —
and refuses the round (``[policy] max_epsilon``) when the total epsilon against the server
would exceed its budget, or (``[policy] require_dp``) when the round has no DP noise at all.

A release is charged when the client's noised input leaves it (an attempt aborted before that
costs nothing), not when the server says the round completed: from then on a server may release
a sum containing it without this client's further help. The ledger is a
JSON file next to the client's configuration, rewritten atomically after every charge, so a
restarted client keeps counting.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_core.round import RoundPlan
from fl_core.toml_config import ConfigError
from secagg.dp.calibration import release_event, releases_epsilon
from secagg.dp.events import DpEvent
from secagg.dp.rdp import AccountingError
from secagg.errors import PolicyViolation


@dataclass
class PrivacyLedger:
    path: Path | None
    max_epsilon: float | None = None
    require_dp: bool = False
    delta: float = 1e-5
    entries: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(
        cls, path: Path | None, max_epsilon: float | None, require_dp: bool, delta: float
    ) -> PrivacyLedger:
        entries: list[dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                entries = list(data["releases"])
                for entry in entries:
                    DpEvent.from_dict(entry["event"])
            except (OSError, ValueError, KeyError, TypeError, AccountingError) as exc:
                raise ConfigError(
                    f"{path}: the privacy ledger is unreadable ({exc}); it is this institution's "
                    "record of the epsilon it spent: restore it rather than delete it"
                ) from None
        return cls(path, max_epsilon, require_dp, delta, entries)

    def events(self) -> list[DpEvent]:
        return [DpEvent.from_dict(e["event"]) for e in self.entries]

    def spent(self) -> float:
        """The epsilon (at ``delta``) against the server of every release charged so far."""
        return releases_epsilon(self.events(), self.delta)

    def _event(self, plan: RoundPlan) -> DpEvent | None:
        dp = plan.codec.dp
        if dp is None:
            return None
        contributors = plan.min_survivors or plan.secagg_params().min_release
        return release_event(dp, contributors)

    def check(self, plan: RoundPlan, client_id: int) -> None:
        """Refuse the round, before anything is computed, when it breaks this institution's
        privacy policy."""
        event = self._event(plan)
        if event is None:
            if self.require_dp:
                raise PolicyViolation(
                    "round parameters refused: the round adds no DP noise and this institution "
                    "requires it ([policy] require_dp)"
                )
            return
        if self.max_epsilon is None:
            return
        total = releases_epsilon([*self.events(), event], self.delta)
        if total > self.max_epsilon:
            raise PolicyViolation(
                f"round parameters refused: with this round client {client_id} would have spent "
                f"epsilon {total:.3g} (delta {self.delta:g}) against the server over "
                f"{len(self.entries) + 1} releases, above its budget {self.max_epsilon:g} "
                "([policy] max_epsilon)"
            )

    def charge(self, plan: RoundPlan, session_id: bytes) -> None:
        """Record the release this client's noised input is going into."""
        event = self._event(plan)
        if event is None:
            return
        self.entries.append(
            {"round": plan.index, "session": session_id.hex(), "event": event.to_dict()}
        )
        if self.path is None:
            return
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"releases": self.entries}, indent=1) + "\n")
        os.replace(temporary, self.path)

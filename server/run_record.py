"""The deployment's run directory: the same record ``fedsec simulate`` writes.

``STATE_DIR/run/`` holds ``run.json`` (the federation's public parameters: backend, secure
aggregation, DP calibration, strategy), one ``metrics.jsonl`` line per released round (cohort and
contributors by institution name, the session, the release floor, and with DP the release's
privacy event, and where the round's PEFT adapter lies) and the server's record of every session
in ``transcripts/``. ``fedsec audit STATE_DIR/run`` reads it as it reads a simulation's. Two
differences, both for the server's resources: the adapters stay in ``checkpoints/`` (pruned by
``keep_checkpoints``) instead of being copied under ``adapters/``, and masked inputs are not
kept (the server's memory stays O(d)), so the audit's uniformity check says "not tested".
A split deployment's ``run.json`` also says where the model is cut and what the server saw
beyond the secure sums (``split``, as a split simulation's).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_core.aggregation import CkksRoundRecord
from fl_core.round import release_record
from fl_core.round_config import MaskingRound, RoundConfig
from fl_core.run_dir import METRICS_FILE, RunWriter
from secagg.dp.calibration import Calibration
from secagg.transcript import Transcript
from server.config import ServerConfig

RUN_DIR = "run"


class DeploymentRunRecord:
    """Appends each released round to ``STATE_DIR/run``; reopened (not rewritten) on restart."""

    def __init__(
        self,
        config: ServerConfig,
        calibration: Calibration | None,
        split: Mapping[str, object] | None = None,
    ) -> None:
        self._config = config
        self._calibration = calibration
        self._split = split
        directory = config.state_dir / RUN_DIR
        if (directory / METRICS_FILE).exists():
            self._writer = RunWriter.reopen(directory)
        else:
            self._writer = RunWriter(directory, self._describe())

    @property
    def directory(self) -> Path:
        return self._writer.directory

    def _describe(self) -> dict[str, Any]:
        config, rounds = self._config, self._config.rounds
        dp: dict[str, Any] | None = None
        if self._calibration is not None and config.dp is not None:
            dp = {**self._calibration.summary(), "clip_l2": config.dp.clip}
        task = config.task
        return {
            "deployment": True,
            "institutions": [config.names.get(c, f"client-{c}") for c in sorted(config.roster)],
            "rounds": rounds.rounds,
            "cohort_size": rounds.cohort_size,
            "min_clients": rounds.min_clients,
            "sampling": {
                "scheme": "the coordinator's draw among the institutions online",
                "coins": "OS CSPRNG, known to the coordinator",
            },
            "backend": rounds.backend,
            "strategy": task.recipe.strategy if task.trains else "fedavg",
            "task": task.kind,
            **({"mode": "split", "split": dict(self._split)} if self._split is not None else {}),
            "secagg": {
                "ring_bits": rounds.ring_bits,
                "corrupt_fraction": rounds.corrupt_fraction,
                "dropout_fraction": rounds.dropout_fraction,
                "threshold": rounds.threshold or "derived per round (active-server floor)",
                "neighbours": rounds.neighbours or None,
            },
            "dp": dp,
        }

    def round(
        self,
        round_config: RoundConfig,
        contributors: tuple[int, ...],
        server_record: Transcript | CkksRoundRecord,
        seconds: float,
        adapter: Path | None,
    ) -> None:
        """Record one released round."""
        names = self._config.names
        agg = round_config.aggregation
        # A CKKS round has no masking session: no threshold, quorum or graph (as 0 on the wire).
        shape = agg.shape if isinstance(agg, MaskingRound) else None
        floor = agg.min_survivors if isinstance(agg, MaskingRound) else 0
        threshold = 0 if shape is None else shape.threshold
        record: dict[str, Any] = {
            "round": round_config.round_number,
            "backend": self._config.rounds.backend,
            "cohort": [names.get(c, f"client-{c}") for c in round_config.cohort],
            "contributors": [names.get(c, f"client-{c}") for c in contributors],
            "session_id": round_config.session_id.hex(),
            "threshold": threshold,
            "min_release": max(threshold, 0 if shape is None else shape.quorum, floor),
            "neighbours": None if shape is None else shape.neighbours,
            "round_s": seconds,
            "adapter": None if adapter is None else str(adapter),
        }
        dp = self._config.dp
        if self._calibration is not None and dp is not None:
            record.update(
                release_record(self._calibration, len(contributors), dp.delta, dp.epsilon)
            )
        self._writer.record(record, server_record)

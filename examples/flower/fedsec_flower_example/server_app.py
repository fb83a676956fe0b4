"""The coordinator's ServerApp: fedsec's workflow in place of ``SecAggPlusWorkflow``.

It plans every round as ``fedsec simulate`` would (same config, strategy, encoding and (k, t)),
runs fedsec's secure aggregation over Flower's Grid, and scores each new global adapter on the
institutions' held-out sets (server-side evaluation: a simulation convenience of the embedded
task, whose held-out data every process can build; a deployment would evaluate on the nodes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsec_flower_example.task import ADAPTER, ROSTER_FILE, ExampleSettings, workload
from fl_core.flower.workflow import FedsecWorkflow
from wire.credentials import load_roster

RESULT_FILE = "flower_result.json"
#: The global adapter vector after each round, stacked (rounds x dim).
VECTORS_FILE = "flower_global_vectors.npy"


def make_server_app(settings: ExampleSettings | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or ExampleSettings.from_run_config(context.run_config)
        begin = time.perf_counter()
        fed, trainer = workload(s)
        roster, _ = load_roster(Path(s.keys_dir) / ROSTER_FILE)
        work = trainer.work
        max_samples = max(len(d) for d in work.train_sets.values())
        workflow = FedsecWorkflow(fed.config, roster, max_samples=max_samples)
        initial = fed.global_vector.copy()
        before = work.pooled(trainer.evaluate(initial))

        vectors: list[np.ndarray] = []

        def evaluate(_round: int, arrays: ArrayRecord) -> dict[str, float]:
            vectors.append(arrays[ADAPTER].numpy())
            losses = trainer.evaluate(vectors[-1])
            return {"eval_loss_pooled": work.pooled(losses)}

        result = workflow.start(grid, ArrayRecord({ADAPTER: Array(initial)}), evaluate)
        summary = {
            "eval_loss_initial": before,
            "eval_loss_pooled": [r.metrics.get("eval_loss_pooled") for r in result.rounds],
            "contributors": [list(r.contributors) for r in result.rounds],
            "aborted": [r.aborted for r in result.rounds],
            "upload_bytes_per_client": [
                float(np.mean(list(r.upload_bytes.values()) or [0])) for r in result.rounds
            ],
            "seconds": time.perf_counter() - begin,
        }
        print(json.dumps(summary), flush=True)
        if s.out_dir:
            out = Path(s.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / RESULT_FILE).write_text(json.dumps(summary))
            np.save(out / VECTORS_FILE, np.stack(vectors))

    return app


app = make_server_app()

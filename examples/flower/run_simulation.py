"""Run the example on Flower's simulation engine (Ray backend), and optionally check it against
``fedsec simulate`` of the same settings. Prints one JSON line.

    .venv/bin/python examples/flower/run_simulation.py --institutions 4 --rounds 3 --compare

``--compare`` also runs the in-process federation that ``fedsec simulate`` runs (same seed,
data, model, strategy, encoding) and reports, per round, both pooled eval losses and the largest
difference between the two global adapters beside the quantisation bound of one round. The two
runs draw their own masks and stochastic-rounding coins (``os.urandom``), so they agree within the
encoding's bound after one round and stay close, not bit-identical, after that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Ray's workers import the apps' module by name: they must find it too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
from fedsec_flower_example.client_app import make_client_app  # noqa: E402
from fedsec_flower_example.server_app import RESULT_FILE, VECTORS_FILE, make_server_app  # noqa: E402
from fedsec_flower_example.task import ExampleSettings, write_keys  # noqa: E402

from clients.simulation import prepare  # noqa: E402


def compare(settings: ExampleSettings, flower_vectors: np.ndarray) -> dict[str, object]:
    """``fedsec simulate``'s rounds of the same settings beside the Flower run's adapters.

    ``round1_diff`` and ``round1_limit``: after one round both runs started from the same
    adapter and trained on the same data the same way, so each global adapter is within one
    quantisation bound of the plaintext FedAvg result, hence within twice the bound of each
    other (plus float32 rounding of the sum, one ulp of the largest coordinate each). Later
    rounds start from adapters that differ by that much, and training amplifies it a little.
    """
    fed, trainer = prepare(settings.spec())
    outcomes = fed.run()
    ours = np.stack([o.global_vector for o in outcomes])
    bound = outcomes[0].metrics.quantization_bound
    ulp = float(np.spacing(np.max(np.abs(ours[0])).astype(np.float32)))
    diffs = np.max(np.abs(flower_vectors - ours), axis=1)
    return {
        "eval_loss_pooled": [trainer.work.pooled(o.metrics.eval_loss) for o in outcomes],
        "quantization_bound_per_round": [o.metrics.quantization_bound for o in outcomes],
        "adapter_max_abs_diff_per_round": [float(d) for d in diffs],
        "adapter_max_abs": float(np.max(np.abs(ours[-1]))),
        "round1_diff": float(diffs[0]),
        "round1_limit": 2 * bound + 2 * ulp,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = ExampleSettings()
    parser.add_argument("--institutions", type=int, default=d.institutions)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--records", type=int, default=d.records)
    parser.add_argument("--eval-records", type=int, default=d.eval_records)
    parser.add_argument("--local-steps", type=int, default=d.local_steps)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="Ray resources per ClientApp worker (workers = cores / this)",
    )
    parser.add_argument("--out", type=Path, default=None, help="(default: a temporary folder)")
    parser.add_argument("--compare", action="store_true", help="also run `fedsec simulate`")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="OUT",
        help="no Flower run: compare the adapters another run (deploy_loopback.sh) saved in OUT",
    )
    args = parser.parse_args(argv)
    if args.institutions < 3 or args.rounds < 1:
        print("error: --institutions must be >= 3 and --rounds >= 1", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsec-flower-"))
    settings = ExampleSettings(
        institutions=args.institutions,
        rounds=args.rounds,
        records=args.records,
        eval_records=args.eval_records,
        local_steps=args.local_steps,
        seed=args.seed,
        keys_dir=str(out / "keys"),
        out_dir=str(out),
    )
    if args.compare_with is not None:
        report = json.loads((args.compare_with / RESULT_FILE).read_text())
        vectors = np.load(args.compare_with / VECTORS_FILE)
        report["fedsec_simulate"] = compare(settings, vectors)
        print(json.dumps(report))
        return 0
    write_keys(settings)

    from flwr.simulation import run_simulation

    begin = time.perf_counter()
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(settings),
        num_supernodes=settings.institutions,
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}},
    )
    flower_s = time.perf_counter() - begin
    if not (out / RESULT_FILE).exists():
        print("error: the Flower run did not finish (see the log above)", file=sys.stderr)
        return 1
    report = json.loads((out / RESULT_FILE).read_text())
    report.update(engine="flower-simulation-ray", flower_s=flower_s, out=str(out))
    if args.compare:
        report["fedsec_simulate"] = compare(settings, np.load(out / VECTORS_FILE))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``fedsec privacy-budget``: the epsilon a DP training plan spends, as one JSON line.

A calculator for T rounds of client-level DP with the Gaussian mechanism (noise multiplier
z = noise std / L2 clip) or the Skellam mechanism (z = noise std / L2 sensitivity in the
encoder's integer units; its discretisation surcharge also depends on the sensitivity and the
padded dimension, which it therefore requires). The numbers come from :mod:`proofs.accountant`
(RDP, dp_accounting's order grid).

``epsilon`` is amplified by Poisson subsampling at ``--sampling-rate`` q: it holds only if each
client is sampled independently with probability q each round *and* the observer cannot see the
coins. Against anyone who knows who was sampled -- fedsec's server, whose cohorts are fixed-size
and drawn from a public seed -- use ``epsilon_without_amplification`` (q = 1: every one of the T
rounds at full rate; pass as ``--rounds`` the rounds one client takes part in), which is what
``fedsec simulate`` calibrates for and ``fedsec audit`` reports.
"""

from __future__ import annotations

import argparse
import json
import math

from fl_core.cli import UsageError
from proofs.accountant import (
    DpEvent,
    GaussianDpEvent,
    SkellamDpEvent,
    epsilon_for_rounds,
)
from secagg.dp.encoder import rounded_l1_bound

AMPLIFICATION_ASSUMES = (
    "Poisson sampling (each client independently with probability q each round) with coins the "
    "observer cannot see; against anyone who knows the cohorts (fedsec's server) the figure is "
    "epsilon_without_amplification"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mechanism", choices=("gaussian", "skellam"), default="gaussian")
    parser.add_argument(
        "--noise-multiplier", type=float, required=True, help="noise std / L2 sensitivity"
    )
    parser.add_argument(
        "--sampling-rate",
        type=float,
        required=True,
        help="client sampling rate q in (0, 1]; epsilon is amplified by it, which assumes "
        "Poisson sampling with coins the observer cannot see (not true against fedsec's "
        "server, who knows the cohorts: see epsilon_without_amplification, or pass 1)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        required=True,
        help="number of rounds T (at q = 1: the rounds one client takes part in)",
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta in (0, 1)")
    parser.add_argument(
        "--l2-sensitivity",
        type=float,
        help="skellam only: L2 sensitivity in integer units (scale x clip, after rounding)",
    )
    parser.add_argument("--dim", type=int, help="skellam only: padded dimension of the update")
    parser.add_argument(
        "--l1-sensitivity",
        type=float,
        help="skellam only: L1 sensitivity (default: min(sqrt(dim), l2) x l2 for integer vectors)",
    )


def _event(args: argparse.Namespace) -> tuple[DpEvent, dict[str, float | int]]:
    z = args.noise_multiplier
    if args.mechanism == "gaussian":
        return GaussianDpEvent(z), {}
    if args.l2_sensitivity is None or args.dim is None:
        raise UsageError(
            "--mechanism skellam needs --l2-sensitivity and --dim: its discretisation "
            "surcharge depends on them"
        )
    l2, dim = args.l2_sensitivity, args.dim
    if not (math.isfinite(l2) and l2 > 0) or dim < 1:
        raise UsageError("--l2-sensitivity must be positive and --dim at least 1")
    l1 = rounded_l1_bound(l2, dim) if args.l1_sensitivity is None else args.l1_sensitivity
    if not (math.isfinite(l1) and l1 > 0):
        raise UsageError(f"--l1-sensitivity must be positive, got {l1}")
    event = SkellamDpEvent(l2, l1, (z * l2) ** 2)
    return event, {"l2_sensitivity": l2, "l1_sensitivity": l1, "dim": dim}


def run(args: argparse.Namespace) -> int:
    z, q, rounds, delta = args.noise_multiplier, args.sampling_rate, args.rounds, args.delta
    if not (math.isfinite(z) and z > 0):
        raise UsageError(f"--noise-multiplier must be a positive number, got {z}")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise UsageError(f"--sampling-rate must be in (0, 1], got {q}")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise UsageError(f"--delta must be in (0, 1), got {delta}")
    event, extra = _event(args)
    epsilon, order = epsilon_for_rounds(event, q, rounds, delta)
    unamplified, _ = epsilon_for_rounds(event, 1.0, rounds, delta)
    record: dict[str, object] = {
        "mechanism": args.mechanism,
        "epsilon": epsilon,
        "order": order,
        "delta": delta,
        "noise_multiplier": z,
        "sampling_rate": q,
        "rounds": rounds,
        "amplification_assumes": AMPLIFICATION_ASSUMES if q < 1 else "none (q = 1)",
        "epsilon_without_amplification": unamplified,
        "adjacency": "zero-out (one client's clipped contribution replaced by zero)",
        **extra,
    }
    print(json.dumps(record))
    return 0

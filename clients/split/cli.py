"""``fedsec simulate --mode split``: the flags of split learning and their checks.

``--mode lora`` (the default) is LoRA FedAvg: every institution trains the whole adapter.
``--mode split`` keeps the embedding, the bottom ``--client-bottom`` blocks, the top
``--client-top`` blocks and the head on each institution and trains the blocks between on the
server (:mod:`fl_core.split`); ``--activation-noise`` is the institutions' defence (noise over
each activation's RMS), ``--server-lr`` the server's learning rate for its part.
"""

from __future__ import annotations

import argparse
import math

from clients.split.trainer import SplitOptions
from fl_core.cli import UsageError
from fl_core.recipe import Recipe
from fl_core.split import SplitConfigError, SplitSpec

MODES = ("lora", "split")
_SPLIT_FLAGS = ("client_bottom", "client_top", "activation_noise", "server_lr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("split learning (--mode split)")
    group.add_argument(
        "--mode",
        default=None,
        choices=MODES,
        help="lora: every institution trains the whole LoRA adapter (LoRA FedAvg, default); "
        "split: institutions keep the embedding, their blocks and the head, the server trains "
        "the blocks between, and only the institutions' part is securely aggregated",
    )
    group.add_argument(
        "--client-bottom",
        type=int,
        default=None,
        help="split: blocks each institution runs before sending activations (default 1; 0 "
        "sends the token embeddings themselves, which the server inverts trivially)",
    )
    group.add_argument(
        "--client-top",
        type=int,
        default=None,
        help="split: top blocks each institution keeps besides the head (default 0)",
    )
    group.add_argument(
        "--activation-noise",
        type=float,
        default=None,
        help="split: Gaussian noise on every activation sent, its standard deviation this "
        "multiple of each position's activation RMS (default 0: none)",
    )
    group.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="split: the server's learning rate for its blocks (default: the clients')",
    )


def options_from_args(args: argparse.Namespace, recipe: Recipe) -> SplitOptions | None:
    """The split settings the flags ask for (None: LoRA FedAvg); one-line refusals."""
    given = [f for f in _SPLIT_FLAGS if getattr(args, f) is not None]
    if (args.mode or "lora") == "lora":
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise UsageError(f"{flags}: only with --mode split")
        return None
    if recipe.strategy == "scaffold":
        raise UsageError(
            "--mode split does not offer SCAFFOLD: its control variates would cover the "
            "institutions' part only; choose another --strategy"
        )
    if recipe.local_steps is None:
        raise UsageError(
            "--mode split counts local steps (the server's schedule): set --local-steps"
        )
    if recipe.quantization != "none":
        raise UsageError(
            "--mode split in one process gives the server its own copy of the base; a 4-bit "
            "(QLoRA) base is not supported there"
        )
    noise = 0.0 if args.activation_noise is None else args.activation_noise
    if not (math.isfinite(noise) and noise >= 0):
        raise UsageError(f"--activation-noise must be >= 0, got {noise}")
    if args.server_lr is not None and not (math.isfinite(args.server_lr) and args.server_lr > 0):
        raise UsageError(f"--server-lr must be a positive number, got {args.server_lr}")
    try:
        spec = SplitSpec(
            1 if args.client_bottom is None else args.client_bottom,
            0 if args.client_top is None else args.client_top,
        )
    except SplitConfigError as exc:
        raise UsageError(str(exc)) from exc
    return SplitOptions(spec, noise, args.server_lr)

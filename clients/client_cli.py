"""``fedsec client --config client.toml``: take part in a federation until it ends.

Logs go to stderr; on exit one JSON line on stdout reports what this institution did (rounds
completed/aborted and the protobuf bytes it sent and received), for drills and load tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clients.client_config import load_client_config
from clients.transport import ClientTransport
from fl_core.cli import add_logging_arguments, configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="client TOML config")
    add_logging_arguments(parser)
    parser.add_argument(
        "--init-adapter",
        type=Path,
        metavar="DIR",
        help="write the initial LoRA adapter (PEFT format) of this config's model to DIR and "
        "exit; the coordinator starts train rounds from it (task.initial_adapter)",
    )


def run(args: argparse.Namespace) -> int:
    config = load_client_config(args.config)
    configure_logging(args, f"%(asctime)s %(levelname)s client-{config.client_id}: %(message)s")
    if args.init_adapter is not None:
        from clients.train_task import LocalTrainer

        LocalTrainer(config).write_initial_adapter(args.init_adapter)
        print(f"wrote the initial adapter to {args.init_adapter}")
        return 0
    transport = ClientTransport(config)
    code = transport.run()
    print(transport.stats.as_json(config.client_id), flush=True)
    return code

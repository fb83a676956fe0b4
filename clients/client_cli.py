"""``fedsec client --config client.toml``: take part in a federation until it ends.

Logs go to stderr; on exit one JSON line on stdout reports what this institution did (rounds
completed/aborted and the protobuf bytes it sent and received), for drills and load tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from clients.client_config import load_client_config
from clients.transport import ClientTransport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="client TOML config")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))


def run(args: argparse.Namespace) -> int:
    config = load_client_config(args.config)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s client-{config.client_id}: %(message)s",
        stream=sys.stderr,
    )
    transport = ClientTransport(config)
    code = transport.run()
    print(transport.stats.as_json(config.client_id), flush=True)
    return code

"""The ``fedsec`` command: a thin dispatcher over subcommands that live in their own packages.

Each subcommand is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``. The
table below names modules as strings and imports only the one that is asked for, so
``fedsec --help`` starts instantly (no torch import) and ``fl_core`` takes no static dependency
on the layers above it (``clients``, ``server``, ``proofs``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Protocol, cast


class _Subcommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: name -> (module, one-line summary). Order is the order shown by ``fedsec --help``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("clients.simulate_cli", "run a whole federation in one process (the main job)"),
    "keygen": ("server.keygen_cli", "identities, a roster and development TLS certificates"),
    "server": ("server.server_cli", "run the aggregation server (gRPC over TLS)"),
    "client": ("clients.client_cli", "take part in a federation as one institution"),
    "he-keys": ("clients.he_keys_cli", "make and share the federation's CKKS keys (institutions)"),
    "status": ("server.status_cli", "rounds, participants and last checkpoint of a server"),
    "audit": (
        "proofs.audit_cli",
        "privacy report of a run: epsilon against the server, transcript checks",
    ),
    "privacy-budget": (
        "proofs.budget_cli",
        "epsilon calculator, one JSON line (amplified figure: Poisson sampling, secret coins)",
    ),
    "attack": ("proofs.attack_cli", "gradient-inversion attacks on each view of an update"),
}


class UsageError(Exception):
    """A problem with the command line or a config file, reported without a traceback."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-file`` of the long-running commands (server, client)."""
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    parser.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="append the log to PATH instead of writing it to stderr",
    )


def configure_logging(args: argparse.Namespace, fmt: str) -> None:
    """Log at ``--log-level`` to stderr or ``--log-file`` (one line per record, UTC times with
    their zone, so logs of institutions in different zones line up)."""
    formatter = logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S%z")
    formatter.converter = time.gmtime
    handler: logging.Handler
    if args.log_file is not None:
        try:
            # Reopens the file when logrotate moves it away.
            handler = logging.handlers.WatchedFileHandler(args.log_file, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--log-file {args.log_file}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level)


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: fedsec <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Run 'fedsec <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fedsec: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, summary = SUBCOMMANDS[name]
    module = cast(_Subcommand, importlib.import_module(module_name))
    parser = argparse.ArgumentParser(prog=f"fedsec {name}", description=summary)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return module.run(args)
    except UsageError as exc:
        print(f"fedsec {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedsec {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``fedsec status | head``): stop quietly, and keep Python's own
        # flush at exit from failing on the closed pipe too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("FEDSEC_DEBUG"):
            raise
        print(
            f"fedsec {name}: internal error: {type(exc).__name__}: {exc} "
            "(set FEDSEC_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    # Re-import so that subcommands raise the same UsageError class this entry point catches
    # (under ``python -m`` this file is ``__main__``, a second copy of the module).
    from fl_core.cli import main as package_main

    raise SystemExit(package_main())

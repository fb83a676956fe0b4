"""``fedsec status --config server.toml``: rounds, participants and the last checkpoint.

Reads the server's SQLite state read-only (WAL mode lets it run beside a live server).
``--json`` prints one JSON object instead of the table, for scripts. Both show the configured
backend and the backend each attempt ran under.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from fl_core.cli import UsageError
from server.config import load_server_config
from server.store import Store, StoreError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="server TOML config")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()


def run(args: argparse.Namespace) -> int:
    config = load_server_config(args.config)
    try:
        store = Store(config.state_dir / "state.db", readonly=True)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    rounds, participants = store.rounds(), store.participants()
    refusals = {r.attempt: store.refusals(r.attempt) for r in rounds}
    last = store.last_completed()
    store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "rounds": [
                        {
                            "round": r.round_number,
                            "attempt": r.attempt,
                            "status": r.status.value,
                            "cohort": list(r.cohort),
                            "contributors": None
                            if r.contributors is None
                            else list(r.contributors),
                            "reason": r.reason,
                            "refusals": [
                                {"client": c, "reason": why} for c, why in refusals[r.attempt]
                            ],
                            "checkpoint": r.checkpoint,
                            "backend": r.backend,
                            "started_at": _iso(r.started_at),
                            "ended_at": _iso(r.ended_at),
                        }
                        for r in rounds
                    ],
                    "participants": [
                        {
                            "id": p.client_id,
                            "name": p.name,
                            "rounds_joined": p.rounds_joined,
                            "rounds_contributed": p.rounds_contributed,
                            "last_contributed": p.last_contributed,
                            "last_seen": _iso(p.last_seen),
                        }
                        for p in participants
                    ],
                    "last_checkpoint": None if last is None else last.checkpoint,
                    "backend": config.rounds.backend,
                }
            )
        )
        return 0
    print(f"backend: {config.rounds.backend}")
    print(f"rounds ({len(rounds)} attempts):")
    for r in rounds:
        detail = (
            f"{len(r.contributors)} contributed" if r.contributors is not None else r.reason or ""
        )
        print(
            f"  round {r.round_number:>4} attempt {r.attempt:>4}  {r.status.value:<9} "
            f"{r.backend:<7} started {_when(r.started_at)}  cohort {len(r.cohort)}  {detail}"
        )
        for client, why in refusals[r.attempt]:
            print(f"      client {client} refused: {why}")
    print(f"participants ({len(participants)}):")
    for p in participants:
        latest = "-" if p.last_contributed is None else str(p.last_contributed)
        print(
            f"  {p.client_id:>6} {p.name:<20} joined {p.rounds_joined:>4}  contributed "
            f"{p.rounds_contributed:>4}  last contributed round {latest:>4}  "
            f"last seen {_when(p.last_seen)}"
        )
    print(f"last checkpoint: {last.checkpoint if last else 'none'}")
    return 0

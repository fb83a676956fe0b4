"""``fedsec server --config server.toml``: run the coordinator until its rounds are done.

Prints one line ``fedsec server listening on HOST:PORT`` on stdout once it accepts connections
(with ``listen = "127.0.0.1:0"`` the port is ephemeral; tests read it from that line). Logs go
to stderr. SIGTERM/SIGINT stop the round loop; an in-flight round is then aborted (nothing
released) and rerun after the next start.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from fl_core.cli import add_logging_arguments, configure_logging
from secagg.protocol import SumBackend
from server.config import ServerConfig, load_server_config
from server.parallel_unmask import ParallelSum
from server.service import build_server
from server.store import StateDirLock, Store, check_history

#: After the last round, keep serving this long so polling clients fetch the final RoundEnd.
FINAL_GRACE_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="server TOML config")
    add_logging_arguments(parser)


def run(args: argparse.Namespace) -> int:
    configure_logging(args, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_server_config(args.config)
    # The state directory is ours alone, and its history intact, before anything starts.
    lock = StateDirLock(config.state_dir)
    store = Store(config.state_dir / "state.db")
    try:
        check_history(config.state_dir, store)
        # The worker processes start before gRPC's threads and stop after them (see
        # server.parallel_unmask: they also exit by themselves if this process is killed).
        pool_context = (
            ParallelSum(config.workers) if config.workers > 1 else contextlib.nullcontext()
        )
        with pool_context as pool:
            return _serve(config, store, pool)
    finally:
        store.close()
        lock.release()


def _serve(config: ServerConfig, store: Store, sum_backend: SumBackend | None) -> int:
    server, runner, port = build_server(config, store, sum_backend)
    try:
        # Before anyone is told we listen: a damaged checkpoint is an error now, not mid-round.
        runner.recover()
    except BaseException:
        server.stop(grace=None)
        raise
    host = config.listen.rsplit(":", 1)[0]
    print(f"fedsec server listening on {host}:{port}", flush=True)
    logging.getLogger("fedsec.server").info(
        "masked-input sums and mask removal on %s",
        f"{config.workers} worker processes" if sum_backend else "the server process",
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("fedsec.server").warning("signal %d: stopping", signum)
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run()
        time.sleep(FINAL_GRACE_S)
    finally:
        server.stop(grace=1.0).wait()
    if runner.stopped_because is not None:
        print(f"fedsec server: stopped: {runner.stopped_because}", file=sys.stderr)
        return 1
    return 0

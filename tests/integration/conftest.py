"""Real server and client processes on loopback: a small harness shared by the tests here.

Each deployment lives in a temp dir made by ``fedsec keygen``; processes run
``fedsec server``/``fedsec client`` through the same entry point users run, with logs in files
the tests poll (no pipes that could fill up and block a process). Every wait has a timeout, so
a hang fails the test instead of blocking CI; every process is killed at teardown.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_core.cli import main as fedsec
from fl_core.round import RoundCodec
from fl_core.round_config import MaskingRound, RandomTask, RoundConfig
from secagg.encoding import QuantizationParams
from secagg.params import SessionShape
from server.checkpoints import load_checkpoint

ENTRY = "import sys; from fl_core.cli import main; sys.exit(main())"
REPO = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self.out = log.with_suffix(".out")
        with log.open("wb") as err, self.out.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", ENTRY, *args], cwd=cwd, stdout=out, stderr=err
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text() + self.out.read_text(errors="replace"))
            if found:
                return found
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the last lines land
                found = re.search(pattern, self.text() + self.out.read_text(errors="replace"))
                if found:
                    return found
                code = self.popen.returncode
                raise AssertionError(f"exit {code} before {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(
            f"timed out waiting for {pattern!r} in {self.log}:\n{self.text()[-3000:]}"
        )

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.log} still running:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@dataclass
class Training:
    """A training deployment's institutions: names, client.toml extras, in-process trainers."""

    names: list[str]
    extras: dict[int, str]
    trainers: dict[int, Any]  # clients.train_task.LocalTrainer


class Deployment:
    def __init__(self, root: Path, clients: int, **rounds: object) -> None:
        self.root = root
        self.procs: list[Proc] = []
        assert (
            fedsec(
                [
                    "keygen",
                    "--out",
                    str(root),
                    "--clients",
                    str(clients),
                    "--port",
                    "1",
                    "--task",
                    "random",
                ]
            )
            == 0
        )
        self.settings: dict[str, object] = {
            "count": 2,
            "cohort_size": clients,
            "min_clients": clients - 1,
            "threshold": 3,
            "neighbours": 0,
            "stage_timeout_s": 5.0,
            # Rounds start as soon as the whole cohort is online; the join timeout only matters
            # when someone is missing, and must outlast process start-up on a loaded machine.
            "join_timeout_s": 30.0,
            "dim": 1000,
            "seed": 7,
            "client_ca": False,
        }
        self.settings.update(rounds)
        self.port = 0
        self._write_server_config()

    def _write_server_config(self) -> None:
        s = self.settings
        (self.root / "server.toml").write_text(
            f"""[server]
listen = "127.0.0.1:{self.port}"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
{'client_ca = "pki/ca.pem"' if s["client_ca"] else ""}
roster = "roster.toml"
state_dir = "state"

[rounds]
count = {s["count"]}
cohort_size = {s["cohort_size"]}
min_clients = {s["min_clients"]}
threshold = {s["threshold"]}
neighbours = {s["neighbours"]}
ring_bits = 32
stage_timeout_s = {s["stage_timeout_s"]}
join_timeout_s = {s["join_timeout_s"]}
seed = {s["seed"]}

[task]
kind = "random"
dim = {s["dim"]}
"""
        )

    def start_server(self, timeout: float = 30.0) -> Proc:
        """``timeout``: how long it may take to listen (a split server builds its model first)."""
        proc = Proc(
            ["server", "--config", "server.toml"],
            self.root / f"server-{len(self.procs)}.log",
            self.root,
        )
        self.procs.append(proc)
        self.port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout).group(1))
        self._write_server_config()  # a restart must come back on the same port
        return proc

    def client_config(self, client_id: int, extra: str = "") -> Path:
        path = self.root / f"client-{client_id}" / "client.toml"
        path.write_text(
            f"""[client]
id = {client_id}
server = "127.0.0.1:{self.port or 1}"
ca_cert = "../pki/ca.pem"
identity = "identity.key"
roster = "../roster.toml"
reconnect_max_s = 1.0
give_up_after_s = 60.0
{extra}"""
        )
        return path

    def set_up_training(self, train: str, records: int, task: Callable[[Path], str]) -> Training:
        """Institutions 1..n training on the embedded synthetic institutions (``train``: their
        ``[train]`` table), built here too for in-process replays; the coordinator's starting
        adapter written with institution 1's model settings; ``task(adapter)`` replaces the
        server's ``[task]`` (and whatever follows it)."""
        # Imported here: only training tests need torch.
        from clients.client_config import load_client_config
        from clients.synthetic import make_federation
        from clients.train_task import LocalTrainer

        clients = int(self.settings["cohort_size"])  # type: ignore[call-overload]
        names = [i.name for i in make_federation(clients, records).institutions]
        extras = {
            c: f'{train}\n[data]\nsynthetic = "{names[c - 1]}"\n' for c in range(1, clients + 1)
        }
        trainers = {
            c: LocalTrainer(load_client_config(self.client_config(c, extras[c]))) for c in extras
        }
        adapter = self.root / "initial-adapter"
        trainers[1].write_initial_adapter(adapter)
        server_toml = self.root / "server.toml"
        text = server_toml.read_text()
        server_toml.write_text(text[: text.index("[task]")] + task(adapter))
        return Training(names, extras, trainers)

    def start_client(self, client_id: int, extra: str = "") -> Proc:
        return self.start_client_from(self.client_config(client_id, extra))

    def start_client_from(self, config: Path) -> Proc:
        log = self.root / f"{config.parent.name}-{config.stem}-{len(self.procs)}.log"
        proc = Proc(["client", "--config", str(config)], log, self.root)
        self.procs.append(proc)
        return proc

    def status(self) -> Any:
        out = subprocess.run(
            [sys.executable, "-c", ENTRY, "status", "--config", "server.toml", "--json"],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return json.loads(out)

    def checkpoint(self, round_number: int) -> np.ndarray:
        path = self.root / "state" / "checkpoints" / f"round-{round_number:06d}.safetensors"
        return load_checkpoint(path).global_vector

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    """``deploy(clients=5, **round_settings)`` -> a fresh deployment, killed at teardown."""
    made: list[Deployment] = []

    def make(clients: int = 5, **rounds: object) -> Deployment:
        d = Deployment(tmp_path / f"d{len(made)}", clients, **rounds)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def round_config(round_number: int, cohort: list[int], dim: int, seed: int) -> RoundConfig:
    """A random round whose public fields (round, cohort, codec, seed) determine the inputs;
    the session id and shape do not."""
    quant = QuantizationParams.fit(32, 1.0, max_clients=len(cohort))
    masking = MaskingRound(SessionShape(3, None, 3), RoundCodec(dim, quant=quant))
    return RoundConfig(round_number, bytes(32), tuple(cohort), masking, RandomTask(seed))

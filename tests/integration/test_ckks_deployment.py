"""The CKKS backend end to end: keys made by `fedsec keygen --backend ckks`, real `fedsec
server` and `fedsec client` processes on loopback, a client lost before its upload and a
decryptor that never answers (the attempt aborts with nothing released and the round is rerun
under a fresh session without it); the server must never hold a secret context or tag key."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from conftest import ENTRY, Proc

from clients.transport import random_update
from fl_core.cli import main as fedsec
from fl_core.round_config import CkksAggregation, CkksRound, RandomTask, RoundConfig
from secagg.he import CKKSParams
from server.checkpoints import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DIM = 1000
SEED = 7
CLIENTS = (1, 2, 3, 4, 5)


def _server_toml(root: Path, port: int) -> None:
    text = (root / "server.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"', text)
    text = text.replace("count = 2", "count = 1")
    # Two of the five clients are lost: a rerun may start with the three left.
    text = text.replace("min_clients = 4", "min_clients = 3")
    # The upload deadline is the join timeout (clients train before they upload); the decrypt
    # deadline is the stage timeout. Short, so a missing client costs seconds; the join timeout
    # long enough that on a loaded machine all five processes are up before round 0 starts
    # (otherwise it starts without a slow starter, and the faults injected below miss it).
    text = text.replace("stage_timeout_s = 30.0", "stage_timeout_s = 4.0")
    text = text.replace("join_timeout_s = 60.0", f"join_timeout_s = 20.0\nseed = {SEED}")
    (root / "server.toml").write_text(text)


def _client_toml(root: Path, client_id: int, port: int, testing: str = "") -> Path:
    path = root / f"client-{client_id}" / "client.toml"
    text = path.read_text().replace(
        "[client]\n", "[client]\nreconnect_max_s = 1.0\ngive_up_after_s = 60.0\n"
    )
    text = re.sub(r'server = "[^"]+"', f'server = "127.0.0.1:{port}"', text)
    path.write_text(text + testing)
    return path


def _files(*roots: Path) -> list[Path]:
    return [
        p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()
    ]


def test_ckks_round_survives_a_lost_client_and_a_silent_decryptor(tmp_path: Path) -> None:
    root = tmp_path / "d"
    assert (
        fedsec(
            [
                "keygen",
                "--out",
                str(root),
                "--clients",
                "5",
                "--backend",
                "ckks",
                "--port",
                "1",
                "--task",
                "random",
            ]
        )
        == 0
    )
    _server_toml(root, 0)
    procs: list[Proc] = []
    try:
        server = Proc(["server", "--config", "server.toml"], root / "server.log", root)
        procs.append(server)
        port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 30).group(1))
        stall = {
            5: '\n[testing]\nstall_before = "he_upload"\n',  # lost before its upload
            1: '\n[testing]\nstall_before = "he_decrypt"\n',  # the decryptor: never answers
        }
        clients = {
            c: Proc(
                ["client", "--config", str(_client_toml(root, c, port, stall.get(c, "")))],
                root / f"client-{c}.log",
                root,
            )
            for c in CLIENTS
        }
        procs.extend(clients.values())
        clients[5].wait_for("stalling before he_upload")
        clients[5].kill()
        clients[1].wait_for("stalling before he_decrypt", 60)
        clients[1].kill()
        # Reruns go on until the lost clients stop counting as online (15 s without a poll).
        assert server.wait_exit(120) == 0
        for c in (2, 3, 4):
            assert clients[c].wait_exit(30) == 0
    finally:
        for proc in procs:
            proc.kill()

    log = server.text()
    assert "stage he_upload closed at its deadline without [5]" in log
    assert "asking client 1 to decrypt the sum of [1, 2, 3, 4]" in log
    assert "decryptor 1 missed its deadline; nothing is released" in log
    assert "aborted, nothing released: NoDecryptor" in log
    assert "asking client 2 to decrypt" not in log.split("decryptor 1 missed its deadline")[0]
    assert "decrypted sum released by client 2" in log

    status = json.loads(
        subprocess.run(
            [sys.executable, "-c", ENTRY, "status", "--config", "server.toml", "--json"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert status["backend"] == "ckks"
    attempts = [(r["status"], r["backend"]) for r in status["rounds"]]
    assert attempts[0] == ("aborted", "ckks") and attempts[-1] == ("completed", "ckks")
    assert all(a == ("aborted", "ckks") for a in attempts[:-1])
    contributors = status["rounds"][-1]["contributors"]
    assert 1 not in contributors and 5 not in contributors and len(contributors) >= 3

    # FedAvg from zero: the checkpoint is the mean of the contributors' updates, within the
    # CKKS error bound (release grid of the sum, then float32 rounding, divided by their count).
    # Round 0's random inputs depend on its number, seed, clip and length only.
    ckks = CkksAggregation(CkksRound(8192, (60, 40, 60), 40, 1, bytes(32)), 1.0, DIM, False)
    config = RoundConfig(0, bytes(32), tuple(sorted(contributors)), ckks, RandomTask(SEED))
    updates = [random_update(config, c).astype(np.float64) for c in contributors]
    n = len(contributors)
    expected = np.sum(updates, axis=0) / n
    params = CKKSParams(clip=1.0, max_clients=n, min_contributors=3)
    bound = (params.release_step(n) + 4 * np.finfo(np.float32).eps) / n + 1e-7
    path = root / "state" / "checkpoints" / "round-000000.safetensors"
    vector = load_checkpoint(path).global_vector
    assert np.abs(vector - expected).max() <= bound
    assert np.abs(expected).max() > 0.3  # the bound is small against the values

    # The server side (its config, roster, TLS, public context and state) holds no secret
    # context: nothing there is a stored secret context, and every file that parses as a
    # TenSEAL context is public. Each secret context lives in its institution's directory only.
    server_side = _files(
        root / "server.toml", root / "roster.toml", root / "pki", root / "he", root / "state"
    )
    assert root / "he" / "public-context.bin" in server_side
    parsed = 0
    for file in server_side:
        data = file.read_bytes()
        assert not data.startswith(b"FSHK"), file
        for offset in (0, 169):  # a bare context, or after the public file's header
            try:
                context = ts.context_from(data[offset:])
            except (ValueError, RuntimeError, TypeError):  # not a TenSEAL context
                continue
            parsed += 1
            assert not context.is_private(), file
    assert parsed >= 1  # the public context itself was checked
    tag_key = (root / "client-2" / "he-secret.ctx").read_bytes()[37:69]  # after magic, fingerprint
    assert len(tag_key) == 32
    for file in server_side:
        assert tag_key not in file.read_bytes(), file
    secrets_found = sorted(p.relative_to(root) for p in root.rglob("he-secret.ctx"))
    assert secrets_found == [Path(f"client-{c}/he-secret.ctx") for c in CLIENTS]
    for c in CLIENTS:
        mode = stat.S_IMODE((root / f"client-{c}" / "he-secret.ctx").stat().st_mode)
        assert mode == 0o600

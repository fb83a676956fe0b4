"""What `fedsec server` refuses before it says it listens: split brain, lost history, damaged
state. Each is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_core.cli import main
from server.checkpoints import Checkpoint, save_checkpoint
from server.store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "d"
    assert main(["keygen", "--out", str(out), "--clients", "3", "--port", "1"]) == 0
    text = (out / "server.toml").read_text()
    (out / "server.toml").write_text(re.sub(r'listen = ".*"', 'listen = "127.0.0.1:0"', text))
    return out


def _fedsec(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fl_core.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _serve(bundle: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_core.cli", "server", "--config", "server.toml"],
        cwd=bundle,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on .*:(\d+)", line)
    assert match, line
    return proc, int(match.group(1))


def test_a_second_server_on_a_held_port_or_state_directory_is_refused(bundle: Path) -> None:
    first, port = _serve(bundle)
    try:
        text = (bundle / "server.toml").read_text()
        other = bundle / "other.toml"
        other.write_text(
            text.replace("127.0.0.1:0", f"127.0.0.1:{port}").replace(
                'state_dir = "state"', 'state_dir = "state2"'
            )
        )
        line = _one_line_error(_fedsec("server", "--config", "other.toml", cwd=bundle))
        assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
        same_dir = _one_line_error(_fedsec("server", "--config", "server.toml", cwd=bundle))
        assert f"another fedsec server (pid {first.pid})" in same_dir
    finally:
        first.terminate()
        first.wait(30)


def test_checkpoints_without_their_history_are_not_overwritten(bundle: Path) -> None:
    save_checkpoint(
        bundle / "state" / "checkpoints", Checkpoint(3, np.zeros(1000, dtype=np.float32))
    )
    line = _one_line_error(_fedsec("server", "--config", "server.toml", cwd=bundle))
    assert "records no completed round" in line and "round-000003.safetensors" in line
    assert "move the checkpoints directory away" in line


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing"])
def test_a_damaged_last_checkpoint_is_an_error_before_listening(bundle: Path, damage: str) -> None:
    state = bundle / "state"
    path = save_checkpoint(state / "checkpoints", Checkpoint(0, np.ones(1000, dtype=np.float32)))
    store = Store(state / "state.db")
    attempt = store.begin_round(0, b"\x01" * 32, (1, 2, 3))
    store.complete_round(attempt, (1, 2, 3), path.name)
    store.close()
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    else:
        path.unlink()
    result = _fedsec("server", "--config", "server.toml", cwd=bundle)
    line = _one_line_error(result)
    assert "round-000000.safetensors" in line
    assert "listening" not in result.stdout


def test_a_damaged_state_database_is_one_line_for_server_and_status(bundle: Path) -> None:
    (bundle / "state").mkdir()
    (bundle / "state" / "state.db").write_bytes(b"not a database at all" * 100)
    for command in ("server", "status"):
        line = _one_line_error(_fedsec(command, "--config", "server.toml", cwd=bundle))
        assert "cannot open the state database" in line


def test_status_into_a_closed_pipe_is_not_a_traceback(bundle: Path) -> None:
    store = Store(bundle / "state" / "state.db")
    for number in range(300):
        store.begin_round(number, number.to_bytes(32, "big"), (1, 2, 3))
        store.abort_round(number + 1, "test")
    store.close()
    result = subprocess.run(
        f"{sys.executable} -m fl_core.cli status --config server.toml | head -1",
        shell=True,
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.startswith("backend:")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_status_tells_joined_from_contributed_and_says_its_time_zone(bundle: Path) -> None:
    store = Store(bundle / "state" / "state.db")
    for client in (1, 2, 3):
        store.seen(client, f"client-{client}")
    first = store.begin_round(0, b"\x01" * 32, (1, 2, 3))
    store.complete_round(first, (1, 2), "round-000000.safetensors")
    second = store.begin_round(1, b"\x02" * 32, (1, 2, 3))
    store.record_refusal(second, 3, "PolicyViolation: threshold 2 < 3")
    store.abort_round(second, "TooFewSurvivors: only 2")
    store.close()
    result = _fedsec("status", "--config", "server.toml", cwd=bundle)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("2 contributed" in line and "cohort 3" in line for line in lines)
    assert "      client 3 refused: PolicyViolation: threshold 2 < 3" in lines
    row3 = next(line for line in lines if "client-3" in line)
    assert "joined    2  contributed    0  last contributed round    -" in row3
    row1 = next(line for line in lines if "client-1" in line)
    assert "contributed    1  last contributed round    0" in row1 and "UTC" in row1
    as_json = json.loads(_fedsec("status", "--config", "server.toml", "--json", cwd=bundle).stdout)
    assert as_json["participants"][0]["rounds_contributed"] == 1
    assert as_json["rounds"][0]["started_at"].endswith("+00:00")

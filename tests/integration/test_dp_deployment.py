"""Distributed DP through the real deployment: the server's ``[dp]`` table, the round's DP codec
on the wire, each institution's own privacy ledger and budget, and a run directory the audit
reads as it reads a simulation's."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from conftest import Deployment

from clients.privacy_ledger import PrivacyLedger
from fl_core.cli import main as fedsec
from secagg.dp.calibration import releases_epsilon
from secagg.dp.events import DpEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIENTS = 5
EPSILON = 8.0


def test_dp_rounds_are_noised_ledgered_refused_over_budget_and_audited(
    deploy: Callable[..., Deployment],
) -> None:
    d = deploy(CLIENTS, count=2, min_clients=4, stage_timeout_s=60.0, join_timeout_s=120.0)
    server_toml = d.root / "server.toml"
    server_toml.write_text(
        server_toml.read_text() + f"\n[dp]\nepsilon = {EPSILON}\ndelta = 1e-5\nclip = 1.0\n"
    )
    server = d.start_server()
    # Institution 5's budget is below what one release costs it: it refuses every round, and the
    # rounds go on without it (4 contributors, the DP floor of a cohort of 5).
    budgets = {c: "" for c in range(1, CLIENTS)} | {CLIENTS: "[policy]\nmax_epsilon = 0.5\n"}
    clients = {c: d.start_client(c, budgets[c]) for c in budgets}
    assert server.wait_exit(400) == 0, server.text()[-3000:]
    for c in range(1, CLIENTS):
        assert clients[c].wait_exit(60) == 0, clients[c].text()[-2000:]
    # It never contributed: it says so and exits 1, so its operator hears of it.
    assert clients[CLIENTS].wait_exit(60) == 1
    assert "refused all 2 rounds" in clients[CLIENTS].text()
    assert "max_epsilon" in clients[CLIENTS].text()
    assert "left round 0" in server.text() and "max_epsilon" in server.text()

    run = d.root / "state" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(r["contributors"] == [f"client-{c}" for c in range(1, CLIENTS)] for r in records)
    assert all(r["min_release"] >= 4 for r in records)
    described = json.loads((run / "run.json").read_text())
    assert described["deployment"] is True and described["dp"]["clip_l2"] == 1.0

    # Each institution's own account, computed from what it was sent, matches the server's.
    server_events = [DpEvent.from_dict(r["dp_event"]) for r in records]
    server_epsilon = releases_epsilon(server_events, 1e-5)
    assert 0 < server_epsilon <= EPSILON
    for c in range(1, CLIENTS):
        ledger = PrivacyLedger.load(
            d.root / f"client-{c}" / "privacy-ledger.json", None, False, 1e-5
        )
        assert len(ledger.entries) == 2
        assert ledger.spent() == pytest.approx(server_epsilon, rel=1e-9)
    refused = d.root / f"client-{CLIENTS}" / "privacy-ledger.json"
    assert not refused.exists()  # nothing of institution 5 left it, nothing was charged

    # The audit reads the deployment's run directory: every transcript check passes.
    assert fedsec(["audit", str(run)]) == 0
    report = json.loads((run / "privacy.json").read_text())
    assert report["passed"] is True
    assert report["differential_privacy"]["epsilon_total"] == pytest.approx(server_epsilon)

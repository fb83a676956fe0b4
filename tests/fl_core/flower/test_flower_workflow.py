"""FedsecWorkflow and FedsecMod on honest, failing and impostor nodes (in-process LocalGrid)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

pytest.importorskip("flwr", reason="needs Flower, the optional extra: pip install 'fedsec[flower]'")

from flwr.app import Context, Message

from fl_core.federation import DpSettings
from fl_core.flower.local_grid import LocalGrid
from fl_core.flower.mod import ClientCredentials
from fl_core.flower.plan import RECORD, STATE
from fl_core.flower.workflow import FedsecWorkflow, FlowerResult
from secagg.keys import Identity
from secagg.messages import SharesDelivery, decode_message
from secagg.protocol import ClientPolicy

from .helpers import FlowerFederation, make_federation


def _start(fed: FlowerFederation, grid: LocalGrid | None = None) -> FlowerResult:
    grid = grid or LocalGrid(fed.app, {node: {} for node in fed.nodes})
    return FedsecWorkflow(fed.config, fed.roster, max_samples=1000).start(grid, fed.initial())


def _assert_mean(
    fed: FlowerFederation, result: FlowerResult, contributors: tuple[int, ...]
) -> None:
    record = result.rounds[-1]
    assert record.aborted is None and record.contributors == contributors
    # A coordinate moves by the weighted mean update; quantisation step here is ~1e-8.
    expected = np.concatenate([np.zeros(12), np.ones(5)]) + fed.expected_mean(contributors)
    np.testing.assert_allclose(result.global_vector, expected, atol=1e-6)


def test_honest_rounds_release_the_weighted_mean_and_nothing_else() -> None:
    fed = make_federation(6, rounds=2)
    result = _start(fed)
    assert [r.contributors for r in result.rounds] == [tuple(range(1, 7))] * 2
    expected = np.concatenate([np.zeros(12), np.ones(5)]) + 2 * fed.expected_mean(
        tuple(range(1, 7))
    )
    np.testing.assert_allclose(result.global_vector, expected, atol=1e-6)
    assert list(result.arrays) == ["w", "b"] and result.arrays["w"].numpy().shape == (3, 4)
    # What the server received per client: protocol messages only (no arrays, no metrics).
    assert all(0 < b < 20_000 for b in result.rounds[0].upload_bytes.values())


def test_distributed_dp_rounds_release_a_noised_mean() -> None:
    fed = make_federation(8, rounds=2, dp=DpSettings(epsilon=5.0, clip=1.0))
    grid = LocalGrid(fed.app, {node: {} for node in fed.nodes})
    workflow = FedsecWorkflow(fed.config, fed.roster, max_samples=1000)
    result = workflow.start(grid, fed.initial())
    assert workflow.federation is not None and workflow.federation.calibration is not None
    assert [r.contributors for r in result.rounds] == [tuple(range(1, 9))] * 2
    # With DP every client has weight 1: the plain mean of the updates, plus the noise.
    move = result.global_vector - np.concatenate([np.zeros(12), np.ones(5)])
    expected = 2 * float(np.mean(list(fed.updates.values())))
    assert abs(float(np.mean(move)) - expected) < 6 * float(np.std(move)) / np.sqrt(move.size)


def test_a_dp_round_below_its_calibrated_floor_releases_nothing() -> None:
    """The noise is sized for at least max(t, n - 5%) contributors; with 3 of 8 gone, abort."""
    fed = make_federation(8, dp=DpSettings(epsilon=5.0, clip=1.0))
    grid = DropAfterSharing(fed, victim=8)
    grid.victims = {n for n, u in fed.nodes.items() if u in (6, 7, 8)}
    result = FedsecWorkflow(fed.config, fed.roster, max_samples=1000).start(grid, fed.initial())
    record = result.rounds[0]
    assert record.aborted is not None and "TooFewSurvivors" in record.aborted
    np.testing.assert_array_equal(result.global_vector, np.concatenate([np.zeros(12), np.ones(5)]))
    # The survivors were told the round is over: no node keeps a session (or its secrets).
    assert all(STATE not in c.state.config_records for c in grid.contexts.values()
               if c.node_id not in grid.victims)  # fmt: skip


def test_secaggplus_graph_on_a_larger_cohort() -> None:
    fed = make_federation(24)
    result = _start(fed)
    assert "seed_commit" in result.rounds[0].stage_s  # SecAgg+: the graph-seed stage ran
    _assert_mean(fed, result, tuple(range(1, 25)))


class DropAfterSharing(LocalGrid):
    """The node of client ``victim`` (or every node in ``victims``) goes silent once it has
    shared its keys."""

    def __init__(self, fed: FlowerFederation, victim: int) -> None:
        super().__init__(fed.app, {node: {} for node in fed.nodes})
        self.victims = {n for n, u in fed.nodes.items() if u == victim}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:
            payload = m.content.config_records[RECORD]["payload"]
            to_victim = m.metadata.dst_node_id in self.victims
            secagg = isinstance(payload, bytes) and payload[:3] == b"FSA"
            if to_victim and secagg and isinstance(decode_message(payload), SharesDelivery):
                self.silent.add(m.metadata.dst_node_id)
        return super().send_and_receive(messages, timeout=timeout)


def test_a_client_that_drops_after_sharing_is_unmasked_out_of_the_sum() -> None:
    fed = make_federation(6)
    result = _start(fed, DropAfterSharing(fed, victim=4))
    _assert_mean(fed, result, (1, 2, 3, 5, 6))


def test_a_client_whose_training_fails_leaves_the_round() -> None:
    fed = make_federation(5)
    fed.failing.add(2)
    result = _start(fed)
    assert "RuntimeError: out of memory" in result.rounds[0].left[2]
    _assert_mean(fed, result, (1, 3, 4, 5))


def test_a_node_that_is_not_who_it_claims_is_not_admitted() -> None:
    impostor_key = Identity.generate()
    holder: dict[str, FlowerFederation] = {}

    def credentials(ctxt: Context) -> ClientCredentials:
        fed = holder["fed"]
        u = fed.nodes[ctxt.node_id]
        key = impostor_key if u == 3 else fed.identities[u]
        return ClientCredentials(u, key, fed.roster)

    fed = make_federation(5, credentials=credentials)
    holder["fed"] = fed
    result = _start(fed)
    assert result.rounds[0].cohort == (1, 2, 4, 5)
    _assert_mean(fed, result, (1, 2, 4, 5))


def test_a_client_refuses_parameters_below_its_policy_before_training() -> None:
    fed = make_federation(5, policy=ClientPolicy(min_threshold=5))
    result = _start(fed)
    record = result.rounds[0]
    assert record.aborted is not None and record.contributors == ()
    assert len(record.left) == 5
    assert all("PolicyViolation" in why for why in record.left.values())
    assert fed.trained == []  # refused before any training
    np.testing.assert_array_equal(result.global_vector, np.concatenate([np.zeros(12), np.ones(5)]))

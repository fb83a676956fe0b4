"""View ``split_activations``: what the server of split learning can read from activations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clients.data import TokenizedDataset
from clients.split.middle import MiddleServer, MiddleSettings
from clients.split.model import SplitModel
from clients.split.trainer import InProcessLink, split_train_local
from clients.trainer import LoraModel, LoraSettings, TrainSettings
from fl_core.split import SplitSpec
from proofs.attacks.errors import AttackInputError
from proofs.attacks.matrix import Scenario
from proofs.attacks.split_activations import (
    nearest_embedding_attack,
    run_attack,
    score,
    split_activation_view,
)

LENGTH = 12


def _victim(scenario: Scenario, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [t for t in scenario.texts[0] if len(t) >= LENGTH][:rows]
    ids = torch.tensor([list(t[:LENGTH]) for t in texts])
    return ids, torch.ones_like(ids)


def _model(scenario: Scenario, depth: int) -> SplitModel:
    lm = LoraModel(copy.deepcopy(scenario.model), LoraSettings(rank=4))  # type: ignore[arg-type]
    return SplitModel(lm, SplitSpec(depth, 0))


def _accuracy(scenario: Scenario, depth: int, attack: str, noise: float) -> float:
    ids, mask = _victim(scenario)
    model = _model(scenario, depth)
    view = split_activation_view(model, ids, mask, noise)
    result = run_attack(attack, view, model, LENGTH, optimisation_steps=50)
    s = score(result, ids, view, LENGTH, scenario.vocab_size, scenario.prior_counts)
    assert 0 <= s.chance_recall <= 1 and s.recovered == len(result.tokens)
    return s.position_accuracy


def test_cut_at_the_embedding_gives_every_token_away(scenario: Scenario) -> None:
    assert _accuracy(scenario, 0, "nearest_embedding", 0.0) == 1.0


def test_one_block_on_the_client_does_not_hide_the_tokens(scenario: Scenario) -> None:
    # The server knows the bottom (public base, released global client part): a search over
    # the vocabulary, position by position, inverts it exactly.
    assert _accuracy(scenario, 1, "greedy", 0.0) == 1.0


def test_activation_noise_lowers_what_the_server_recovers(scenario: Scenario) -> None:
    clean = _accuracy(scenario, 0, "nearest_embedding", 0.0)
    noisy = _accuracy(scenario, 0, "nearest_embedding", 4.0)
    assert noisy < 0.5 < clean


def test_nearest_embedding_needs_the_cut_at_the_embedding(scenario: Scenario) -> None:
    ids, mask = _victim(scenario)
    model = _model(scenario, 1)
    with pytest.raises(AttackInputError, match="block 0"):
        nearest_embedding_attack(split_activation_view(model, ids, mask, 0.0), model, LENGTH)


def test_the_view_is_what_a_real_step_sends(scenario: Scenario) -> None:
    """The first step of a local round sends exactly the view the attacks read: the bottom of
    the global client part (which the server knows) on the batch."""
    ids, mask = _victim(scenario, rows=3)
    client = _model(scenario, 1)
    middle_model = SplitModel(copy.deepcopy(client.lm), client.spec)
    seen: list[np.ndarray] = []
    middle = MiddleServer(
        middle_model, MiddleSettings(lr=0.01), observer=lambda c, s, h, n: seen.append(h.copy())
    )
    middle.begin_round([1], 1, client.limits(4, LENGTH))
    data = TokenizedDataset(tuple(r.numpy() for r in ids), tuple(r.numpy().copy() for r in ids), 0)
    settings = TrainSettings(local_steps=1, batch_size=3, lr=0.01, num_threads=None)
    global_client = client.client_vector()
    split_train_local(client, global_client, data, settings, 0, InProcessLink(middle, 1))
    attacker = _model(scenario, 1)
    attacker.set_client_vector(global_client)
    # batch_indices permutes the rows; compare as a set of rows.
    want = split_activation_view(attacker, ids, mask, 0.0).activation
    got = seen[0]
    order = [int(np.argmin([np.abs(g - w).max() for w in want])) for g in got]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(got, want[order], rtol=1e-5, atol=1e-6)

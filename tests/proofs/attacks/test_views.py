from __future__ import annotations

import os

import numpy as np
import pytest

from proofs.attacks.errors import AttackInputError
from proofs.attacks.views import (
    aggregate_dp_view,
    aggregate_view,
    flatten,
    masked_view,
    plaintext_view,
    unflatten,
)
from secagg.encoding import QuantizationParams, decode_sum, encode
from secagg.protocol import RoundParams
from secagg.simulate import simulate_round


def _updates(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"a.weight": rng.normal(0, 0.01, (8, 16)), "b.weight": rng.normal(0, 0.01, (40,))}
        for _ in range(n)
    ]


def test_flatten_round_trips() -> None:
    update = _updates(1)[0]
    vector, layout = flatten(update)
    back = unflatten(vector, layout)
    assert back.keys() == update.keys()
    for name in update:
        np.testing.assert_array_equal(back[name], update[name])
    with pytest.raises(AttackInputError):
        unflatten(vector[:-1], layout)


def test_masked_view_is_uncorrelated_with_the_update() -> None:
    # Large enough that the sample correlation of independent vectors has a standard deviation
    # near 1/sqrt(4640) ~ 0.015, so the 0.2 bound below is ~13 sigma, not a coin toss.
    rng = np.random.default_rng(0)
    update = {"a.weight": rng.normal(0, 0.01, (64, 64)), "b.weight": rng.normal(0, 0.01, (544,))}
    update["a.weight"][:4] *= 50.0  # structure an attacker would look for
    view = masked_view(update, n_clients=2, clip=1.0)
    plain, _ = flatten(update)
    masked, _ = flatten(view)
    assert np.corrcoef(plain, masked)[0, 1] == pytest.approx(0.0, abs=0.2)
    # The masked words are uniform over the whole ring: after decoding, almost every coordinate
    # lies outside ±clip, where no (clipped) update coordinate can be.
    assert np.mean(np.abs(masked) > 1.0) > 0.8
    # Fresh masks every time: two views of the same update share nothing.
    again, _ = flatten(masked_view(update, n_clients=2, clip=1.0))
    assert np.corrcoef(masked, again)[0, 1] == pytest.approx(0.0, abs=0.2)


def test_aggregate_view_is_what_secure_aggregation_releases() -> None:
    updates = _updates(3, seed=1)
    expected = aggregate_view(updates)
    vectors = [flatten(u)[0] for u in updates]
    params = QuantizationParams.fit(32, clip=1.0, max_clients=3)
    cohort = (1, 2, 3)
    round_params = RoundParams(
        session_id=os.urandom(32), ring_bits=32, dim=vectors[0].size, threshold=2, cohort=cohort
    )
    inputs = {u: encode(v, params).vector for u, v in zip(cohort, vectors, strict=True)}
    released = simulate_round(round_params, inputs).result
    assert released.contributors == cohort
    decoded = decode_sum(released.sum, params, len(cohort)).total
    # Equal up to the stochastic rounding: below one quantization step per client.
    np.testing.assert_allclose(decoded, flatten(expected)[0], atol=3 * params.step)


def test_dp_view_adds_noise_larger_than_the_signal_at_small_epsilon() -> None:
    updates = _updates(2, seed=2)
    exact, _ = flatten(aggregate_view(updates))
    noisy, _ = flatten(aggregate_dp_view(updates, epsilon=1.0, delta=1e-5, clip=1.0))
    assert noisy.shape == exact.shape
    assert np.linalg.norm(noisy - exact) > np.linalg.norm(exact)


def test_views_refuse_what_they_cannot_model() -> None:
    one = _updates(1)
    with pytest.raises(AttackInputError):
        aggregate_view(one)
    with pytest.raises(AttackInputError):
        aggregate_dp_view(one, epsilon=1.0, delta=1e-5, clip=1.0)
    with pytest.raises(AttackInputError):
        masked_view(one[0], n_clients=1, clip=1.0)
    other = {"a.weight": np.zeros((8, 16))}
    with pytest.raises(AttackInputError):
        aggregate_view([one[0], other])
    with pytest.raises(AttackInputError):
        plaintext_view({})

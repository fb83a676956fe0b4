"""The round core: one codec, one plan, one client step for every driver."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fl_core.round import EncodingSpec, RoundCodec, RoundPlan, client_contribution, round_context
from fl_core.strategies import ClientOptions, build_strategy
from secagg.dp.calibration import calibrate
from secagg.errors import ConfigurationError
from secagg.params import session_shape

RNG = np.random.default_rng(5)  # public test data


def test_plain_codec_sums_weighted_contributions_within_one_step() -> None:
    spec = EncodingSpec(contribution_size=50, ring_bits=32, clip=1.0, max_weight=20)
    codec = spec.codec(3)
    units = [RNG.uniform(-1, 1, 50) for _ in range(3)]
    weights = [3, 7, 20]
    ring = codec.quant.ring if codec.quant else None
    assert ring is not None
    total = ring.zeros(codec.encoded_dim)
    for unit, weight in zip(units, weights, strict=True):
        total = ring.reduce(total + codec.encode(unit, weight).vector)
    released = codec.decode(total, 3)
    assert released.weight_sum == 30 and released.num_contributors == 3
    exact = sum(w * u for u, w in zip(units, weights, strict=True))
    step = 1 / codec.quant.scale  # type: ignore[union-attr]
    # Stochastic rounding (< one step per client) and the float32 release (2^-24 relative).
    bound = 3 * step + 2.0**-24 * float(np.max(np.abs(exact)))
    assert np.max(np.abs(released.contribution_sum - exact)) < bound


def test_dp_codec_rotates_freshly_each_round_and_decodes_the_noised_sum() -> None:
    calibration = calibrate(
        mechanism="skellam",
        epsilon=8.0,
        delta=1e-5,
        participations=1,
        expected_cohort=4,
        dropouts=1,
        ring_bits=32,
        clip=1.0,
        dim=64,
        seed=os.urandom(32),
    )
    spec = EncodingSpec(64, 32, 1.0, dp=calibration.params)
    first, second = spec.codec(4), spec.codec(4)
    assert first.dp is not None and second.dp is not None and first.dp.seed != second.dp.seed
    with pytest.raises(ConfigurationError, match="weight 1"):
        first.encode(np.zeros(64), 3)
    with pytest.raises(ConfigurationError, match="sized for at most"):
        spec.codec(calibration.params.max_clients + 1)
    ring = first.dp.ring
    total = ring.zeros(first.encoded_dim)
    for _ in range(4):
        total = ring.reduce(total + first.encode(np.full(64, 0.01), 1).vector)
    released = first.decode(total, 4)
    assert released.weight_sum == 4 and released.contribution_sum.shape == (64,)


def test_a_codec_is_either_plain_or_dp() -> None:
    with pytest.raises(ConfigurationError, match="exactly one"):
        RoundCodec(10)


def test_the_plan_binds_the_codec_and_the_round_context_binds_model_and_options() -> None:
    codec = EncodingSpec(10, 32, 1.0).codec(4)
    plan = RoundPlan(0, os.urandom(32), (1, 2, 3, 4), session_shape(4), codec)
    params = plan.secagg_params()
    assert params.dim == 11 and params.threshold == 3 and params.signature_quorum == 3
    other = dataclasses.replace(plan, codec=EncodingSpec(10, 32, 2.0).codec(4))
    assert plan.client_context(b"ctx") != other.client_context(b"ctx")
    model = np.zeros(10, np.float32)
    base = round_context(0, model, ClientOptions(lr=None))
    assert base != round_context(1, model, ClientOptions(lr=None))
    assert base != round_context(0, model + 1, ClientOptions(lr=None))
    assert base != round_context(0, model, ClientOptions(lr=None, prox_mu=0.1))
    control = ClientOptions(lr=None, server_control=np.ones(10, np.float32))
    assert round_context(0, model, control) != round_context(
        0, model, ClientOptions(lr=None, server_control=np.zeros(10, np.float32))
    )


def test_the_client_step_follows_the_strategy_rule() -> None:
    delta = RNG.normal(size=8).astype(np.float32)
    unit, weight = client_contribution(build_strategy("fedavg", 8), delta, 5, None, dp=False)
    assert weight == 5 and np.allclose(unit, delta)
    unit, weight = client_contribution(build_strategy("fedavg", 8), delta, 5, None, dp=True)
    assert weight == 1 and np.allclose(unit, delta)  # a sample count cannot scale under DP
    scaffold = build_strategy("scaffold", 8, {"num_clients": 4})
    control = RNG.normal(size=8).astype(np.float32)
    unit, weight = client_contribution(scaffold, delta, 5, control, dp=False)
    assert weight == 1 and unit.shape == (16,) and np.allclose(unit[8:], control)

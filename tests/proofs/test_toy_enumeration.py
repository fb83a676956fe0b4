"""The exhaustive toy-size security statement: the server's view reveals the sum, nothing else."""

from __future__ import annotations

import pytest

from proofs.toy_enumeration import (
    Scenario,
    both_shares_scenario,
    check_scenario,
    enumerate_masks,
    honest_scenario,
    main,
)
from secagg.errors import ConfigurationError


def test_three_clients_over_z8_without_dropout_reveal_only_the_sum() -> None:
    result = check_scenario(honest_scenario(3), bits=3)
    assert result.input_tuples == 8**3
    assert result.mask_assignments == 8**6  # b_1, b_2, b_3, s_12, s_13, s_23
    assert result.distinct_sums == 8
    assert result.reveals_only_the_sum, result.summary()
    # Power: inputs with different sums give different views, so the comparison can fail.
    assert result.indistinguishable_sums is None


def test_dropped_client_with_revealed_pair_keys_leaks_nothing_beyond_the_survivor_sum() -> None:
    scenario = honest_scenario(3, dropped=[2])
    assert scenario.follows_protocol
    assert scenario.keys_revealed == frozenset({2})
    result = check_scenario(scenario, bits=3)
    # Only x_0 + x_1 is revealed: tuples differing only in the dropped client's input, or with
    # the same survivor sum, are indistinguishable; different survivor sums are not.
    assert result.reveals_only_the_sum, result.summary()
    assert result.distinct_sums == 8
    assert result.indistinguishable_sums is None


def test_both_shares_of_one_client_break_the_guarantee() -> None:
    scenario = both_shares_scenario(3, victim=0)
    assert not scenario.follows_protocol
    result = check_scenario(scenario, bits=2)
    assert not result.reveals_only_the_sum
    assert result.same_sum_counterexample is not None
    first, second = result.same_sum_counterexample
    assert sum(first) % 4 == sum(second) % 4
    assert first[0] != second[0]  # the victim's own input is what the view separates


def test_four_clients_with_two_dropouts_over_z2() -> None:
    result = check_scenario(honest_scenario(4, dropped=[1, 3]), bits=1)
    assert result.mask_assignments == 2 ** (4 + 6)
    assert result.reveals_only_the_sum
    assert result.indistinguishable_sums is None


def test_mask_enumeration_is_complete_and_refuses_sizes_that_cannot_be_exhaustive() -> None:
    masks = enumerate_masks(2, 2)  # b_0, b_1, s_01 over Z_4
    assert masks.shape == (64, 3)
    assert len({tuple(row) for row in masks.tolist()}) == 64
    with pytest.raises(ConfigurationError, match="exhaustive"):
        enumerate_masks(5, 3)


def test_scenarios_naming_unknown_clients_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="outside"):
        Scenario("bad", 3, frozenset({0, 3}), frozenset({0}), frozenset())
    with pytest.raises(ConfigurationError, match="no client sent"):
        Scenario("empty", 3, frozenset(), frozenset(), frozenset())


def test_main_reports_every_scenario_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bits", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "separates equal-sum inputs" in lines[2]

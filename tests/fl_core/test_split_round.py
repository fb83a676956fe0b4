"""The pure parts of split learning: the cut's ownership, the turn order, the step limits."""

from __future__ import annotations

import numpy as np
import pytest

from fl_core.split import (
    ClientDropped,
    NotInRound,
    NotYourTurn,
    Phase,
    SplitConfigError,
    SplitLayout,
    SplitRound,
    SplitSpec,
    SplitTensorError,
    StepLimits,
    StepOutOfOrder,
    layer_index,
    step_bytes,
)
from fl_core.updates import LoraLayout

PREFIX = "base_model.model.model.layers"


def _layout() -> LoraLayout:
    names = ["base_model.model.lm_head.lora_A.weight"]
    names += [f"{PREFIX}.{i}.self_attn.q_proj.lora_B.weight" for i in range(4)]
    return LoraLayout(tuple((n, (2, 3)) for n in sorted(names)))


def test_ownership_follows_the_cut() -> None:
    split = SplitLayout.partition(_layout(), PREFIX, SplitSpec(1, 1), 4)
    assert [layer_index(n, PREFIX) for n in split.client.names] == [None, 0, 3]
    assert [layer_index(n, PREFIX) for n in split.server.names] == [1, 2]
    full = np.arange(split.full.size, dtype=np.float32)
    client, server = split.split(full)
    np.testing.assert_array_equal(split.join(client, server), full)


@pytest.mark.parametrize(("bottom", "top"), [(4, 0), (2, 2), (0, 4)])
def test_no_server_block_is_refused(bottom: int, top: int) -> None:
    with pytest.raises(SplitConfigError, match="leaves the server none"):
        SplitLayout.partition(_layout(), PREFIX, SplitSpec(bottom, top), 4)


def test_negative_depth_is_refused() -> None:
    with pytest.raises(SplitConfigError, match=">= 0"):
        SplitSpec(-1, 0)


def test_turns_run_in_order_and_a_drop_passes_the_turn() -> None:
    r = SplitRound([2, 5, 9], steps=2)
    with pytest.raises(NotYourTurn):
        r.activation(5, 0)
    with pytest.raises(NotInRound):
        r.activation(3, 0)
    r.activation(2, 0)
    with pytest.raises(StepOutOfOrder, match="waits for the gradient of step 0"):
        r.activation(2, 0)
    assert r.gradient(2, 0) is False
    with pytest.raises(StepOutOfOrder):
        r.gradient(2, 1)
    r.activation(2, 1)
    assert r.gradient(2, 1) is True
    assert r.current == 5 and r.phase_of(2) is Phase.FINISHED
    r.drop(9, "lost")  # not its turn yet: skipped when it comes
    r.activation(5, 0)
    r.drop(5, "missed its deadline")
    assert r.done and r.finished == (2,) and set(r.dropped) == {5, 9}
    with pytest.raises(ClientDropped, match="missed its deadline"):
        r.gradient(5, 0)


def test_turn_order_must_be_the_sorted_cohort() -> None:
    with pytest.raises(SplitConfigError):
        SplitRound([3, 1], steps=1)


def test_step_limits_refuse_before_allocation() -> None:
    limits = StepLimits(batch_size=4, max_length=16, hidden_size=8)
    assert limits.max_bytes == 4 * 4 * 16 * 8
    limits.check_activation((2, 10, 8), [10, 4])
    for shape, lengths, match in [
        ((5, 10, 8), [10] * 5, "rows"),
        ((2, 17, 8), [17, 1], "tokens per row"),
        ((2, 10, 9), [10, 1], "hidden width"),
        ((2, 10, 8), [10], "row lengths"),
        ((2, 10, 8), [9, 4], "longest row"),
        ((2, 10, 8), [10, 0], r"lie in \[1, 10\]"),
    ]:
        with pytest.raises(SplitTensorError, match=match):
            limits.check_activation(shape, lengths)
    with pytest.raises(SplitTensorError):
        limits.check_like((2, 9, 8), (2, 10, 8))


def test_step_bytes_count_two_tensors_each_way() -> None:
    assert step_bytes(2, 10, 8) == {"up": 2 * 640 + 8, "down": 2 * 640}

"""The round plan a Flower client binds, and the missing-extra error (no Flower needed)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import pytest

from fl_core.errors import UpdateLayoutError
from fl_core.flower import FlowerNotInstalled, require_flwr
from fl_core.flower.plan import (
    FlowerPlanError,
    FlowerRound,
    arrays_digest,
    flatten,
    join_signed_bytes,
    layout_of,
    unflatten,
)
from fl_core.round import EncodingSpec, RoundPlan
from fl_core.strategies import ClientOptions
from secagg.dp.encoder import DpParams
from secagg.dp.noise import NoiseSpec
from secagg.params import SessionShape


def _round(dp: bool = False) -> FlowerRound:
    spec = EncodingSpec(40, 32, 0.05, max_weight=100)
    if dp:
        params = DpParams(32, 40, 1.0, 100.0, NoiseSpec("skellam", 3.0), os.urandom(32), 10)
        spec = EncodingSpec(40, 32, 0.05, dp=params)
    plan = RoundPlan(2, os.urandom(32), (1, 2, 3, 4, 5), SessionShape(4, None, 4), spec.codec(5))
    return FlowerRound(plan, "fedavg", ClientOptions(0.01, 0.0))


@pytest.mark.parametrize("dp", [False, True])
def test_plan_bytes_round_trip_exactly(dp: bool) -> None:
    original = _round(dp)
    data = original.to_bytes()
    decoded = FlowerRound.from_bytes(data)
    assert decoded == original
    assert decoded.plan.secagg_params() == original.plan.secagg_params()


def _edit(data: bytes, **changes: Any) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def test_plan_bytes_are_read_strictly() -> None:
    data = _round().to_bytes()
    bad = [
        data + b" ",  # not canonical
        data.replace(b'"version":1', b'"version":2'),
        _edit(data, extra=1),
        _edit(data, threshold="4"),
        _edit(data, threshold=True),
        _edit(data, prox_mu="x"),
        _edit(data, cohort=[1, 2, "3"]),
        b"\xff",
    ]
    for item in bad:
        with pytest.raises(FlowerPlanError):
            FlowerRound.from_bytes(item)


def test_scaffold_control_variates_are_refused() -> None:
    plan = _round().plan
    with pytest.raises(FlowerPlanError, match="SCAFFOLD"):
        FlowerRound(plan, "scaffold", ClientOptions(0.01, 0.0, np.zeros(3, np.float32)))


def test_join_bytes_bind_every_field() -> None:
    n, m = b"n" * 32, b"m" * 32
    variants = {
        join_signed_bytes(*args)
        for args in ((n, 1, 2, 3), (m, 1, 2, 3), (n, 9, 2, 3), (n, 1, 9, 3), (n, 1, 2, 9))
    }
    assert len(variants) == 5


def test_arrays_flatten_and_digest() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    layout = layout_of(arrays.items())
    vector = flatten(arrays, layout)
    assert vector.tolist() == [0, 1, 2, 3, 4, 5, 1, 1]
    back = unflatten(vector, layout)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    swapped = {"b": arrays["b"], "a": arrays["a"]}
    assert arrays_digest(arrays) != arrays_digest(swapped)
    with pytest.raises(UpdateLayoutError):
        flatten(swapped, layout)
    with pytest.raises(UpdateLayoutError):
        layout_of([("x", np.zeros(2, np.float64))])


def test_missing_flower_is_one_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr", None)  # what an environment without flwr sees
    with pytest.raises(FlowerNotInstalled, match=r"pip install 'fedsec\[flower\]'"):
        require_flwr()

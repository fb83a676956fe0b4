"""The named LoRA layout: flatten/unflatten are exact inverses and mismatches are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fl_core.errors import NonFiniteUpdateError, UpdateLayoutError
from fl_core.updates import LoraLayout, check_finite

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        B: rng.normal(size=(6, 2)).astype(np.float32),
        A: rng.normal(size=(2, 5)).astype(np.float32),
    }


def test_roundtrip_is_exact_and_order_is_by_name() -> None:
    tensors = _tensors()
    layout = LoraLayout.from_tensors(tensors)
    assert layout.names == (A, B)
    vector = layout.flatten(tensors)
    assert vector.dtype == np.float32 and vector.shape == (22,)
    np.testing.assert_array_equal(vector[:10], tensors[A].reshape(-1))
    back = layout.unflatten(vector)
    assert set(back) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name])


def test_flatten_refuses_missing_extra_shape_and_dtype() -> None:
    layout = LoraLayout.from_tensors(_tensors())
    with pytest.raises(UpdateLayoutError, match="missing"):
        layout.flatten({A: _tensors()[A]})
    with pytest.raises(UpdateLayoutError, match="unexpected"):
        layout.flatten({**_tensors(), "x.lora_B.weight": np.zeros(1, np.float32)})
    with pytest.raises(UpdateLayoutError, match="shape"):
        layout.flatten({**_tensors(), A: np.zeros((5, 2), np.float32)})
    with pytest.raises(UpdateLayoutError, match="float32"):
        layout.flatten({**_tensors(), A: _tensors()[A].astype(np.float64)})


def test_unflatten_refuses_wrong_length_and_dtype() -> None:
    layout = LoraLayout.from_tensors(_tensors())
    with pytest.raises(UpdateLayoutError, match="entries"):
        layout.unflatten(np.zeros(21, np.float32))
    with pytest.raises(UpdateLayoutError, match="float32"):
        layout.unflatten(np.zeros(22, np.float64))


def test_select_json_and_fingerprint() -> None:
    layout = LoraLayout.from_tensors(_tensors())
    only_b = layout.select(lambda n: ".lora_B." in n)
    assert only_b.names == (B,) and only_b.size == 12
    assert LoraLayout.from_json(layout.to_json()) == layout
    assert layout.fingerprint() != only_b.fingerprint()
    with pytest.raises(UpdateLayoutError):
        LoraLayout.from_json('{"entries": 3}')
    with pytest.raises(UpdateLayoutError, match="sorted"):
        LoraLayout(((B, (1,)), (A, (1,))))


def test_check_finite_refuses_nan_and_inf() -> None:
    check_finite(np.ones(3, np.float32), "ok")
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteUpdateError, match="1 NaN/Inf"):
            check_finite(np.array([0.0, bad, 1.0], np.float32), "update")

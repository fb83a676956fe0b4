"""The named layout of LoRA tensors, and flatten/unflatten between tensors and one vector.

Secure aggregation sums flat vectors, so every client and the server must agree on which
coordinate is which. A :class:`LoraLayout` fixes that: an ordered tuple of (name, shape) pairs,
sorted by name (PEFT state-dict keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), and nothing else. Flatten
and unflatten are exact inverses; any difference in names, shapes or dtype is refused rather than
silently reshaped, because a mismatch here would scramble the aggregate without any error.
Numpy only: the server uses this module without torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fl_core.errors import NonFiniteUpdateError, UpdateLayoutError

DTYPE = np.dtype(np.float32)


@dataclass(frozen=True)
class LoraLayout:
    """Ordered (name, shape) entries; the vector is their C-order concatenation in this order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.entries]
        if len(set(names)) != len(names):
            raise UpdateLayoutError("layout has duplicate tensor names")
        if names != sorted(names):
            raise UpdateLayoutError("layout entries must be sorted by name")
        for name, shape in self.entries:
            if any(d < 1 for d in shape):
                raise UpdateLayoutError(f"tensor {name!r} has an empty shape {shape}")

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray]) -> LoraLayout:
        return cls(tuple((name, tuple(tensors[name].shape)) for name in sorted(tensors)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.entries)

    def select(self, keep: Callable[[str], bool]) -> LoraLayout:
        """The sub-layout of the named tensors ``keep`` accepts (e.g. only ``lora_B`` for FFA)."""
        return LoraLayout(tuple(e for e in self.entries if keep(e[0])))

    def fingerprint(self) -> str:
        """SHA-256 of the layout, so two parties can check they index vectors identically."""
        text = json.dumps([[name, list(shape)] for name, shape in self.entries])
        return hashlib.sha256(text.encode()).hexdigest()

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float32 vector; ``tensors`` must hold exactly this layout's names and shapes."""
        missing = set(self.names) - set(tensors)
        extra = set(tensors) - set(self.names)
        if missing or extra:
            raise UpdateLayoutError(
                f"tensor names differ from the layout: missing {sorted(missing)[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {sorted(extra)[:3]}"
                f"{'...' if len(extra) > 3 else ''}"
            )
        out = np.empty(self.size, dtype=DTYPE)
        offset = 0
        for name, shape in self.entries:
            tensor = tensors[name]
            if tensor.dtype != DTYPE:
                raise UpdateLayoutError(f"tensor {name!r} has dtype {tensor.dtype}, need float32")
            if tuple(tensor.shape) != shape:
                raise UpdateLayoutError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, layout says {shape}"
                )
            n = tensor.size
            out[offset : offset + n] = tensor.reshape(-1)
            offset += n
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The exact inverse of :meth:`flatten` (the arrays are copies, not views)."""
        if vector.ndim != 1 or vector.dtype != DTYPE:
            raise UpdateLayoutError(
                f"need a 1-D float32 vector, got {vector.ndim}-D {vector.dtype}"
            )
        if vector.size != self.size:
            raise UpdateLayoutError(f"vector has {vector.size} entries, layout has {self.size}")
        tensors: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in self.entries:
            n = int(np.prod(shape))
            tensors[name] = vector[offset : offset + n].reshape(shape).copy()
            offset += n
        return tensors

    def to_json(self) -> str:
        return json.dumps({"entries": [[name, list(shape)] for name, shape in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> LoraLayout:
        try:
            raw = json.loads(text)
            entries = tuple(
                (str(name), tuple(int(d) for d in shape)) for name, shape in raw["entries"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UpdateLayoutError(f"not a serialised LoRA layout: {exc}") from exc
        return cls(entries)


def check_finite(vector: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf: one such value would poison the whole secure sum irrecoverably."""
    if not np.all(np.isfinite(vector)):
        bad = int(np.count_nonzero(~np.isfinite(vector)))
        raise NonFiniteUpdateError(f"{what} has {bad} NaN/Inf entries of {vector.size}")

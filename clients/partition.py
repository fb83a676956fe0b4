"""Split one data set into institutions, reproducibly from a seed (for simulations).

* ``iid``: a seeded permutation cut into N near-equal shares;
* ``field``: one institution per distinct value of a record field (Dolly's ``category``, a
  hospital id), named after the value;
* ``dirichlet``: the usual label-skew benchmark (Hsu et al. 2019): for every value of a field,
  the shares of the N institutions are drawn from Dirichlet(alpha), so a small alpha gives each
  institution a few dominant values. Redrawn (same seed stream) until every institution holds at
  least ``min_records``; refused when that does not happen in 100 draws.

Data order only: nothing secret is drawn from these generators.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fl_core.errors import FLError

Scheme = Literal["iid", "field", "dirichlet"]
SCHEMES: tuple[Scheme, ...] = ("iid", "field", "dirichlet")


class PartitionError(FLError, ValueError):
    """A split that cannot be made (too few records, a field some records lack, ...)."""


@dataclass(frozen=True)
class PartitionSpec:
    scheme: Scheme
    institutions: int | None = None  # field: the distinct values decide
    field: str | None = None
    alpha: float = 0.5
    seed: int = 0
    min_records: int = 2

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PartitionError(f"unknown partition {self.scheme!r}; one of {', '.join(SCHEMES)}")
        if self.scheme in ("field", "dirichlet") and not self.field:
            raise PartitionError(f"partition {self.scheme} needs a field to split by")
        if self.scheme != "field" and (self.institutions is None or self.institutions < 2):
            raise PartitionError(f"partition {self.scheme} needs 2 or more institutions")
        if not self.alpha > 0:
            raise PartitionError(f"dirichlet alpha must be > 0, got {self.alpha}")


def _name(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-") or "empty"


def partition(labels: Sequence[str | None], spec: PartitionSpec) -> dict[str, list[int]]:
    """Institution name -> indices into the data set (each index in exactly one institution).

    ``labels`` holds each record's value of ``spec.field`` (None where it is missing), or
    anything for ``iid``.
    """
    n = len(labels)
    rng = np.random.default_rng([spec.seed, 0x9A27])
    if spec.scheme != "iid":
        missing = [i + 1 for i, v in enumerate(labels) if v is None]
        if missing:
            raise PartitionError(
                f"{len(missing)} record(s) have no field {spec.field!r} (first: record "
                f"{missing[0]}); every record needs it to be split by it"
            )
    if spec.scheme == "field":
        values = sorted({str(v) for v in labels})
        if spec.institutions is not None and spec.institutions != len(values):
            raise PartitionError(
                f"field {spec.field!r} has {len(values)} distinct values, not the "
                f"{spec.institutions} institutions asked for"
            )
        if len(values) < 2:
            raise PartitionError(f"field {spec.field!r} has only one value: one institution")
        names = {v: _name(v) for v in values}
        if len(set(names.values())) != len(names):
            raise PartitionError(f"values of field {spec.field!r} collide as institution names")
        out = {names[v]: [i for i, label in enumerate(labels) if label == v] for v in values}
    elif spec.scheme == "iid":
        order = rng.permutation(n)
        out = {
            f"institution-{k + 1}": sorted(part.tolist())
            for k, part in enumerate(np.array_split(order, spec.institutions or 0))
        }
    else:
        out = _dirichlet(labels, spec, rng)
    small = {name: len(ix) for name, ix in out.items() if len(ix) < spec.min_records}
    if small:
        raise PartitionError(
            f"institutions with fewer than {spec.min_records} records: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(small.items()))
            + f" of {n} records; use fewer institutions or more data"
        )
    return out


def _dirichlet(
    labels: Sequence[str | None], spec: PartitionSpec, rng: np.random.Generator
) -> dict[str, list[int]]:
    count = spec.institutions or 0
    by_value: dict[str, list[int]] = {}
    for i, v in enumerate(labels):
        by_value.setdefault(str(v), []).append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(count)]
        for value in sorted(by_value):
            members = rng.permutation(by_value[value])
            shares = rng.dirichlet(np.full(count, spec.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= spec.min_records:
            return {f"institution-{k + 1}": sorted(p) for k, p in enumerate(parts)}
    raise PartitionError(
        f"dirichlet(alpha={spec.alpha}) left an institution with fewer than "
        f"{spec.min_records} of {len(labels)} records in 100 draws; raise alpha or the data"
    )

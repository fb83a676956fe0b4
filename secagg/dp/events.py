"""Privacy events: immutable records of what one release (or a composition of releases) did,
in the style of Google's ``dp_accounting`` ``DpEvent`` classes.

Calibration emits the event of each release (:func:`secagg.dp.calibration.release_event`), the
run directory stores it as :meth:`DpEvent.to_dict` and the audit reads it back with
:meth:`DpEvent.from_dict` and composes it (:mod:`proofs.accountant`): the accounting is
exchanged as these objects, never as loose keys that each side interprets its own way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from secagg.dp.rdp import AccountingError


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise AccountingError(f"{name} must be a {kind} finite number, got {value!r}")


@dataclass(frozen=True)
class DpEvent:
    """Base of the privacy events; ``to_dict`` gives a JSON-ready record for run reports and
    ``from_dict`` reads it back."""

    _TYPES: ClassVar[dict[str, type[DpEvent]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        DpEvent._TYPES[cls.__name__] = cls

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> DpEvent:
        """The event ``to_dict`` wrote; :class:`AccountingError` for anything else."""
        if not isinstance(data, Mapping):
            raise AccountingError(f"a privacy event is an object, got {type(data).__name__}")
        kind = DpEvent._TYPES.get(str(data.get("type")))
        if kind is None:
            raise AccountingError(f"unknown privacy event type {data.get('type')!r}")
        values: dict[str, Any] = {}
        for f in fields(kind):
            if f.name not in data:
                raise AccountingError(f"{kind.__name__} without its field {f.name!r}")
            raw = data[f.name]
            if f.name == "event":
                values[f.name] = DpEvent.from_dict(raw)
            elif f.name == "events":
                values[f.name] = tuple(DpEvent.from_dict(e) for e in raw)
            else:
                values[f.name] = raw
        try:
            return kind(**values)
        except TypeError as exc:
            raise AccountingError(f"{kind.__name__}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The event's fields, and its class under ``"type"`` (not ``"event"``: that is the
        field of the sampled and self-composed events, which would overwrite it)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, DpEvent):
                out[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                out[f.name] = [v.to_dict() if isinstance(v, DpEvent) else v for v in value]
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class GaussianDpEvent(DpEvent):
    """Gaussian noise of std ``noise_multiplier`` times the L2 sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_positive("noise_multiplier", self.noise_multiplier, allow_zero=True)


@dataclass(frozen=True)
class SkellamDpEvent(DpEvent):
    """Symmetric Skellam noise on integer vectors, all in integer (scaled) units.

    ``variance`` is the per-coordinate variance of the *total* noise in the released sum;
    ``l2_sensitivity``/``l1_sensitivity`` bound one client's contribution (after rounding).
    """

    l2_sensitivity: float
    l1_sensitivity: float
    variance: float

    def __post_init__(self) -> None:
        _check_positive("l2_sensitivity", self.l2_sensitivity)
        _check_positive("l1_sensitivity", self.l1_sensitivity)
        _check_positive("variance", self.variance)

    @property
    def noise_multiplier(self) -> float:
        """std / L2 sensitivity: the Gaussian-equivalent noise multiplier."""
        return math.sqrt(self.variance) / self.l2_sensitivity


@dataclass(frozen=True)
class DistributedDiscreteGaussianDpEvent(DpEvent):
    """The sum of ``num_clients`` discrete Gaussians of scale ``local_stddev`` (integer units)
    added to integer vectors of dimension ``dim`` with the given sensitivities."""

    l2_sensitivity: float
    l1_sensitivity: float
    local_stddev: float
    num_clients: int
    dim: int

    def __post_init__(self) -> None:
        _check_positive("l2_sensitivity", self.l2_sensitivity)
        _check_positive("l1_sensitivity", self.l1_sensitivity)
        _check_positive("local_stddev", self.local_stddev)
        if self.num_clients < 1 or self.dim < 1:
            raise AccountingError("num_clients and dim must be at least 1")


@dataclass(frozen=True)
class PoissonSampledDpEvent(DpEvent):
    sampling_probability: float
    event: DpEvent

    def __post_init__(self) -> None:
        q = self.sampling_probability
        if not (math.isfinite(q) and 0 <= q <= 1):
            raise AccountingError(f"sampling probability must be in [0, 1], got {q!r}")


@dataclass(frozen=True)
class SelfComposedDpEvent(DpEvent):
    event: DpEvent
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise AccountingError(f"count must be a non-negative integer, got {self.count!r}")


@dataclass(frozen=True)
class ComposedDpEvent(DpEvent):
    events: tuple[DpEvent, ...] = field(default_factory=tuple)

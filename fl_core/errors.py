"""Errors raised by :mod:`fl_core`: every refusal names what was wrong and where.

They derive from :class:`FLError` so a caller can catch the whole family; the ones that are
about bad input also derive from :class:`ValueError` for callers that only know the builtins.
"""

from __future__ import annotations


class FLError(Exception):
    """Base class of every error raised by :mod:`fl_core` and :mod:`clients`."""


class UpdateLayoutError(FLError, ValueError):
    """Tensors or vectors that do not match the named LoRA layout (name, shape, dtype, length)."""


class NonFiniteUpdateError(FLError, ValueError):
    """An update or aggregate containing NaN or Inf; it must never be submitted or applied."""


class StrategyConfigError(FLError, ValueError):
    """An unknown strategy name, an unknown or invalid hyper-parameter, or bad server state."""


class AdapterFormatError(FLError, ValueError):
    """A directory that is not a PEFT LoRA adapter this layout can read or write."""


class SamplingError(FLError, ValueError):
    """Client-sampling parameters that cannot produce a cohort (size 0, fraction outside (0, 1])."""


class AggregationError(FLError, ValueError):
    """A released aggregate the strategy cannot use (no contributors, zero weight, wrong size)."""


class RoundConfigError(FLError, ValueError):
    """A round configuration whose parts contradict each other (a codec sized for another
    cohort or weight, a weighted round without a training task), or a question it cannot
    answer (the masking plan of a CKKS round)."""

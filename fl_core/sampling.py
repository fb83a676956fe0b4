"""Per-round client sampling: which institutions are asked to train in round ``r``.

The cohort is a deterministic function of (seed, round, population), so a restarted server or
a replayed simulation draws the same cohorts. Sampling is uniform without replacement; the
randomness is not secret (the cohort is public), so numpy's generator is appropriate here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fl_core.errors import SamplingError


@dataclass(frozen=True)
class ClientSampler:
    """Exactly one of ``cohort_size`` (a fixed number) or ``fraction`` (of the population)."""

    seed: int
    cohort_size: int | None = None
    fraction: float | None = None
    min_cohort: int = 1

    def __post_init__(self) -> None:
        if (self.cohort_size is None) == (self.fraction is None):
            raise SamplingError("set exactly one of cohort_size and fraction")
        if self.cohort_size is not None and self.cohort_size < 1:
            raise SamplingError(f"cohort_size must be >= 1, got {self.cohort_size}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise SamplingError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_cohort < 1:
            raise SamplingError(f"min_cohort must be >= 1, got {self.min_cohort}")

    def size(self, population: int) -> int:
        """Cohort size for a population; refuses one too small for ``min_cohort``."""
        if self.cohort_size is not None:
            k = self.cohort_size
        else:
            k = max(1, math.ceil((self.fraction or 0.0) * population))
        k = max(k, self.min_cohort)
        if k > population:
            raise SamplingError(f"cannot sample {k} clients from a population of {population}")
        return k

    def sample(self, round_index: int, clients: Sequence[str]) -> tuple[str, ...]:
        """The cohort of ``round_index``, in the order of ``clients`` (sorted for stability)."""
        if round_index < 0:
            raise SamplingError(f"round index must be >= 0, got {round_index}")
        if len(set(clients)) != len(clients):
            raise SamplingError("client ids must be unique")
        ordered = sorted(clients)
        k = self.size(len(ordered))
        # One independent stream per (seed, round): cohorts do not depend on earlier rounds.
        rng = np.random.default_rng([self.seed, round_index])
        chosen = np.sort(rng.choice(len(ordered), size=k, replace=False))
        return tuple(ordered[i] for i in chosen)

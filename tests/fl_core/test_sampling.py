"""Client sampling: seeded per round, right size, refuses impossible cohorts."""

from __future__ import annotations

import pytest

from fl_core.errors import SamplingError
from fl_core.sampling import ClientSampler

CLIENTS = [f"inst-{i:02d}" for i in range(20)]


def test_same_seed_same_cohorts_and_rounds_differ() -> None:
    a, b = ClientSampler(seed=7, cohort_size=5), ClientSampler(seed=7, cohort_size=5)
    cohorts = [a.sample(r, CLIENTS) for r in range(10)]
    assert cohorts == [b.sample(r, list(reversed(CLIENTS))) for r in range(10)]
    assert len(set(cohorts)) > 1
    assert all(len(c) == 5 and len(set(c)) == 5 and set(c) <= set(CLIENTS) for c in cohorts)
    assert ClientSampler(seed=8, cohort_size=5).sample(0, CLIENTS) != cohorts[0] or (
        ClientSampler(seed=8, cohort_size=5).sample(1, CLIENTS) != cohorts[1]
    )


def test_fraction_rounds_up_and_respects_min_cohort() -> None:
    assert ClientSampler(seed=0, fraction=0.12).size(20) == 3
    assert ClientSampler(seed=0, fraction=0.01, min_cohort=4).size(20) == 4
    assert ClientSampler(seed=0, fraction=1.0).sample(3, CLIENTS) == tuple(sorted(CLIENTS))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"cohort_size": 2, "fraction": 0.5}, {"cohort_size": 0}, {"fraction": 1.5}],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(SamplingError):
        ClientSampler(seed=0, **kwargs)  # type: ignore[arg-type]


def test_cohort_larger_than_population_is_refused() -> None:
    with pytest.raises(SamplingError, match="population of 3"):
        ClientSampler(seed=0, cohort_size=4).sample(0, ["a", "b", "c"])
    with pytest.raises(SamplingError, match="unique"):
        ClientSampler(seed=0, cohort_size=1).sample(0, ["a", "a"])

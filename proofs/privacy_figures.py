"""The differential-privacy figures of a run, each with the observer it holds against.

Input: the metrics records of a run (one privacy event per noised round, :func:`round_event`)
and who contributed to each release (the transcripts' contributor ids). Output:
:class:`DpSummary`, whose :class:`PrivacyFigure` s ``fedsec audit`` writes to ``privacy.md`` and
``privacy.json``:

* **against the server** (the figure the noise is calibrated for, and the run's total): the
  server sees every cohort, every released sum and every model, so sampling hides nothing from
  it. Each release an institution's update is in is composed at full rate, per institution
  (a round it is not in does not touch its data); the figure is that of the worst-off
  institution (:func:`proofs.accountant.composition` of its events). Zero-out adjacency, and
  the replace-one figure beside it (:func:`proofs.accountant.replace_one`).
* **amplified by sampling, for an observer of the released models only**: amplification by
  subsampling holds only for Poisson sampling whose coins the observer cannot see. fedsec draws
  fixed-size cohorts from the run's public seed, so this figure is *not applicable* and the
  report says why; the figure against the server bounds this observer too.

A ``sampling_rate`` in a metrics record (written by earlier versions) is ignored: amplifying by
it was the overstatement this module replaces.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proofs.accountant import (
    AccountingError,
    DistributedDiscreteGaussianDpEvent,
    DpEvent,
    GaussianDpEvent,
    RdpAccountant,
    SkellamDpEvent,
    composition,
    replace_one,
)

#: Record fields each mechanism needs, beyond ``delta``. The Gaussian bound is *not* used for
#: the integer mechanisms when their fields are missing: it would understate their epsilon.
MECHANISM_FIELDS: dict[str, tuple[str, ...]] = {
    "gaussian": ("noise_multiplier",),
    "skellam": ("l2_sensitivity", "l1_sensitivity", "variance"),
    "ddgauss": ("l2_sensitivity", "l1_sensitivity", "local_stddev", "num_clients", "dim"),
}
_MECHANISM_ALIASES = {
    "distributed_discrete_gaussian": "ddgauss",
    "discrete_gaussian": "ddgauss",
    "dgauss": "ddgauss",
}

ZERO_OUT = (
    "zero-out, client level: one institution's clipped update replaced by zero (the cohort, "
    "the contributor count and every institution's noise unchanged)"
)
REPLACE_ONE = (
    "replace-one, client level: one institution's data swapped for any other (two zero-out "
    "steps: the same noise at twice the sensitivity)"
)
SERVER = (
    "the coordinating server (and anyone who knows the run's seed): it sees every cohort, "
    "every released sum and every model"
)
RELEASE_OBSERVER = (
    "an observer of the released models only, who cannot see who was sampled in which round"
)

#: Who contributed to each release of a round, by round: one collection of client ids per
#: release. A round missing from the mapping counts for every institution.
Releases = Mapping[int, Sequence[Collection[int]]]


@dataclass(frozen=True)
class PrivacyFigure:
    """One (epsilon, delta) and what it holds against. ``epsilon`` is None when the figure is
    not applicable (then ``basis`` says why) and ``math.inf`` when it is unbounded."""

    name: str
    observer: str
    adjacency: str
    applicable: bool
    epsilon: float | None
    delta: float | None
    basis: str
    event: DpEvent | None = None  # composed privacy event of the worst-off institution

    def to_dict(self) -> dict[str, Any]:
        unbounded = self.epsilon is not None and math.isinf(self.epsilon)
        return {
            "name": self.name,
            "observer": self.observer,
            "adjacency": self.adjacency,
            "applicable": self.applicable,
            "epsilon": None if self.epsilon is None or unbounded else self.epsilon,
            "epsilon_unbounded": unbounded,
            "delta": self.delta,
            "basis": self.basis,
            "event": None if self.event is None else self.event.to_dict(),
        }


@dataclass(frozen=True)
class DpSummary:
    enabled: bool  # every round was noised and accounted
    delta: float | None
    epsilon_total: float  # against the server (the first figure)
    statement: str
    events: tuple[dict[str, Any], ...]  # one per noised round, as released (full rate)
    problems: tuple[str, ...]  # reasons accounting was impossible (a failed check)
    figures: tuple[PrivacyFigure, ...] = ()
    most_releases: int | None = None  # most releases one institution's update is in
    epsilon_target: float | None = None  # what the noise was calibrated for, if recorded


def round_event(record: Mapping[str, Any]) -> DpEvent | None:
    """The privacy event of one release from its metrics record (at full rate), or None when the
    round added no DP noise: the ``dp_event`` calibration emitted, or for runs recorded before
    there was one, the event rebuilt from the loose keys they carry. :class:`AccountingError`
    when the record names a mechanism without the fields it needs."""
    if "dp_event" in record:
        return DpEvent.from_dict(record["dp_event"])
    raw = record.get("mechanism")
    if raw is None and record.get("noise_multiplier") is None:
        return None
    mechanism = _MECHANISM_ALIASES.get(str(raw), str(raw)) if raw is not None else "gaussian"
    if mechanism not in MECHANISM_FIELDS:
        raise AccountingError(
            f"round {record.get('round')}: unknown DP mechanism {raw!r} "
            f"(known: {', '.join(MECHANISM_FIELDS)})"
        )
    missing = [f for f in MECHANISM_FIELDS[mechanism] if not isinstance(record.get(f), int | float)]
    if missing:
        raise AccountingError(
            f"round {record.get('round')}: mechanism {mechanism!r} cannot be accounted without "
            f"{', '.join(missing)} in the metrics record"
        )
    if mechanism == "gaussian":
        return GaussianDpEvent(float(record["noise_multiplier"]))
    if mechanism == "skellam":
        return SkellamDpEvent(
            float(record["l2_sensitivity"]),
            float(record["l1_sensitivity"]),
            float(record["variance"]),
        )
    return DistributedDiscreteGaussianDpEvent(
        float(record["l2_sensitivity"]),
        float(record["l1_sensitivity"]),
        float(record["local_stddev"]),
        int(record["num_clients"]),
        int(record["dim"]),
    )


def sampling_note(config: Mapping[str, Any]) -> str:
    """Why the amplified figure does not apply to this run, from its ``run.json``."""
    sampling = config.get("sampling")
    institutions = config.get("institutions")
    cohort = config.get("cohort_size")
    if isinstance(institutions, list) and cohort == len(institutions):
        how = "every institution takes part in every round, so there is nothing to amplify"
    elif isinstance(sampling, Mapping) and sampling.get("scheme") == "fixed-size":
        how = (
            "its cohorts are fixed-size and drawn from the run's public seed, so anyone who "
            "knows the seed knows them"
        )
    else:
        how = "it records no Poisson sampling with coins kept from the observer"
    return (
        "not applicable: amplification by subsampling holds only for Poisson sampling whose "
        f"coins the observer cannot see, and in this run {how}. The figure against the server "
        "bounds this observer too (it sees less)."
    )


class _Ledgers:
    """Per-institution RDP accountants; rounds with unknown contributors go to all of them
    (and to ``None``, an institution in no recorded release). Each one's epsilon is cached and
    recomputed only when it composed something new."""

    def __init__(self) -> None:
        self._everyone: list[DpEvent] = []
        self.accountants: dict[int | None, RdpAccountant] = {None: RdpAccountant()}
        self._epsilon: dict[int | None, float] = {}

    def add(self, event: DpEvent, clients: Collection[int] | None) -> None:
        if clients is None:
            self._everyone.append(event)
            for accountant in self.accountants.values():
                accountant.compose(event)
            self._epsilon.clear()
            return
        for client in clients:
            if client not in self.accountants:
                self.accountants[client] = RdpAccountant()
                for earlier in self._everyone:
                    self.accountants[client].compose(earlier)
            self.accountants[client].compose(event)
            self._epsilon.pop(client, None)

    def worst(self, delta: float) -> tuple[float, tuple[DpEvent, ...]]:
        """The largest epsilon over institutions, with that institution's events."""
        for client, accountant in self.accountants.items():
            if client not in self._epsilon:
                self._epsilon[client] = accountant.get_epsilon(delta)
        client = max(self._epsilon, key=lambda c: self._epsilon[c])
        return self._epsilon[client], self.accountants[client].ledger


def account(
    metrics: Sequence[Mapping[str, Any]], releases: Releases, sampling: str
) -> tuple[list[tuple[float, float]], DpSummary]:
    """(epsilon of the round's release alone, epsilon against the server so far) per record,
    and the run's summary; ``sampling`` is :func:`sampling_note` of the run."""
    problems: list[str] = []
    events: list[DpEvent | None] = []
    for record in metrics:
        try:
            events.append(round_event(record))
        except AccountingError as exc:
            problems.append(str(exc))
            events.append(None)
    deltas = {
        float(r["delta"])
        for r, e in zip(metrics, events, strict=True)
        if e is not None and isinstance(r.get("delta"), int | float)
    }
    if any(e is not None for e in events) and len(deltas) != 1:
        problems.append(
            "rounds with DP must state one common delta; found "
            + (", ".join(f"{d:g}" for d in sorted(deltas)) if deltas else "none")
        )
    delta = next(iter(deltas)) if len(deltas) == 1 else None
    per_round: list[tuple[float, float]] = []
    ledgers = _Ledgers()
    unbounded = False
    for record, event in zip(metrics, events, strict=True):
        if event is None or delta is None:
            unbounded = True
            per_round.append((math.inf, math.inf))
            continue
        rnd = int(record["round"])
        released = releases.get(rnd)
        if released is not None and len(released) > 1:
            problems.append(
                f"round {rnd}: {len(released)} sums released in one session; the noise is "
                "sized for one release per round, so their differences are not covered"
            )
        for clients in [None] if released is None else released:
            ledgers.add(event, None if clients is None else set(clients))
        alone = RdpAccountant().compose(event).get_epsilon(delta)
        per_round.append((alone, math.inf if unbounded else ledgers.worst(delta)[0]))
    noised = [e for e in events if e is not None]
    enabled = bool(noised) and len(noised) == len(events) and not problems
    total = per_round[-1][1] if per_round and not problems else math.inf
    targets = [r.get("epsilon_target") for r in metrics]
    target = min((float(t) for t in targets if isinstance(t, int | float)), default=None)
    figures: tuple[PrivacyFigure, ...] = ()
    most: int | None = None
    if enabled and delta is not None:
        worst, ledger = ledgers.worst(delta)
        most = len(ledger)
        swapped = max(
            RdpAccountant().compose(replace_one(composition(a.ledger))).get_epsilon(delta)
            for a in ledgers.accountants.values()
            if a.ledger
        )
        figures = _figures(worst, swapped, delta, most, composition(ledger), sampling)
    statement = _statement(problems, noised, events, total, delta, most)
    summary = DpSummary(
        enabled=enabled,
        delta=delta,
        epsilon_total=total,
        statement=statement,
        events=tuple(e.to_dict() for e in noised),
        problems=tuple(problems),
        figures=figures,
        most_releases=most,
        epsilon_target=target,
    )
    return per_round, summary


def _figures(
    worst: float,
    swapped: float,
    delta: float,
    most: int,
    event: DpEvent,
    sampling: str,
) -> tuple[PrivacyFigure, ...]:
    basis = (
        f"RDP accounting, per institution, of the released sums its update is in (the worst-off "
        f"institution's: {most}), each composed at full rate: the server knows the cohorts, so "
        "no amplification by sampling is claimed"
    )
    return (
        PrivacyFigure("against the server", SERVER, ZERO_OUT, True, worst, delta, basis, event),
        PrivacyFigure(
            "against the server, replace-one",
            SERVER,
            REPLACE_ONE,
            True,
            swapped,
            delta,
            basis,
            replace_one(event),
        ),
        PrivacyFigure(
            "amplified by sampling", RELEASE_OBSERVER, ZERO_OUT, False, None, None, sampling
        ),
    )


def _statement(
    problems: Sequence[str],
    noised: Sequence[DpEvent],
    events: Sequence[DpEvent | None],
    total: float,
    delta: float | None,
    most: int | None,
) -> str:
    if problems:
        return "epsilon could not be computed: " + "; ".join(problems)
    if not noised:
        return (
            "Differential privacy was OFF: epsilon is unbounded (infinite). Secure aggregation "
            "hides each institution's update from the server, but nothing limits what the "
            "released sums and the final model reveal about any one institution's data."
        )
    if len(noised) < len(events):
        return (
            f"{len(events) - len(noised)} of {len(events)} rounds ran without DP noise, so the "
            "run's epsilon is unbounded (infinite) even though other rounds were noised."
        )
    statement = (
        f"({total:.4g}, {delta:g})-DP against the server, at the level of one institution "
        f"(zero-out: its clipped update replaced by zero), for the worst-off institution (its "
        f"update is in {most} of the {len(events)} released sums), each release composed at full "
        "rate by RDP accounting. The server sees the cohorts, so no amplification by sampling "
        "is claimed, for it or for anyone."
    )
    if any(not isinstance(e, GaussianDpEvent) for e in noised):
        statement += (
            " The integer mechanisms are accounted for their ideal noise distributions; "
            "the sampler's deviation from them is charged by the noise calibration "
            "(secagg.dp.calibration), not here."
        )
    return statement

"""Executable security statement: at toy size, the server's view depends on the inputs only
through their sum.

For a tiny ring Z_{2^bits} and a handful of clients we enumerate *every* assignment of the
secret masks of Bonawitz et al. (pairwise seeds s_uv and self-mask seeds b_u, each modelled as
a uniform ring element, i.e. an ideal PRG) and compute the exact distribution of what the server
sees, for every input tuple:

    y_u = x_u + b_u + sum_{v>u} s_uv - sum_{v<u} s_vu   (mod 2^bits)

The server's view is the masked inputs y_u of the clients that sent one, plus whatever the
unmask stage reveals: the self masks b_u of the survivors, and the pairwise seeds s_uv of every
dropped client u (reconstructed from its key shares). The statement checked is exact, not
statistical: two input tuples whose revealed sum (over the clients that sent a masked input)
is equal give *identical* view distributions, and two tuples with different sums give
different ones -- the latter shows the check has the power to fail. A scenario in which the
server obtains both the self mask and the key of one surviving client (what the protocol's
"never both shares for one client" rule forbids) is included as a negative control: there the
view separates inputs with equal sums.

Assumptions made explicit: the PRG is ideal (a seed's expansion is replaced by one uniform ring
element, so the toy has vectors of dimension 1); the network reveals the participant set,
which is therefore part of the scenario rather than of the distribution.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError

#: Enumerations of more mask assignments than this are refused: the point of this module is an
#: exhaustive check that runs in seconds, not an approximation.
MAX_ENUMERATION = 1 << 20
#: Views with at most this many possible values are tabulated as a histogram; larger view
#: spaces are compared as sorted lists of view codes (the same multiset, just slower).
MAX_TABLE = 1 << 20

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Scenario:
    """What the server ends up holding in one execution.

    ``sent``: clients whose masked input y_u reached the server (the set U3).
    ``self_masks_revealed``: clients whose self-mask seed b_u the server reconstructed.
    ``keys_revealed``: clients whose pairwise-mask key the server reconstructed, which gives
    it s_uv for every neighbour v of u.
    """

    name: str
    n_clients: int
    sent: frozenset[int]
    self_masks_revealed: frozenset[int]
    keys_revealed: frozenset[int]

    def __post_init__(self) -> None:
        if self.n_clients < 2:
            raise ConfigurationError(f"need at least 2 clients, got {self.n_clients}")
        everyone = frozenset(range(self.n_clients))
        for label, group in (
            ("sent", self.sent),
            ("self_masks_revealed", self.self_masks_revealed),
            ("keys_revealed", self.keys_revealed),
        ):
            if not group <= everyone:
                raise ConfigurationError(
                    f"scenario {self.name!r}: {label} names clients outside 0..{self.n_clients - 1}"
                )
        if not self.sent:
            raise ConfigurationError(f"scenario {self.name!r}: no client sent a masked input")

    @property
    def follows_protocol(self) -> bool:
        """True when the revealed secrets are exactly what an honest unmask stage releases."""
        everyone = frozenset(range(self.n_clients))
        return self.self_masks_revealed == self.sent and self.keys_revealed == everyone - self.sent


def honest_scenario(n_clients: int, dropped: Sequence[int] = ()) -> Scenario:
    """The view of an honest execution in which ``dropped`` never sent a masked input."""
    gone = frozenset(dropped)
    sent = frozenset(range(n_clients)) - gone
    name = "no dropout" if not gone else f"client(s) {sorted(gone)} dropped before masked input"
    return Scenario(name, n_clients, sent, sent, gone)


def both_shares_scenario(n_clients: int, victim: int) -> Scenario:
    """No dropout, but the server also obtained ``victim``'s key: the forbidden double request."""
    everyone = frozenset(range(n_clients))
    return Scenario(
        f"server obtained both self mask and key of client {victim}",
        n_clients,
        everyone,
        everyone,
        frozenset({victim}),
    )


def _pairs(n_clients: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(n_clients), 2))


def enumerate_masks(n_clients: int, bits: int) -> IntArray:
    """Every assignment of (b_0..b_{n-1}, s_uv for u<v), one row each, in Z_{2^bits}.

    Columns 0..n-1 are the self masks; the rest follow ``itertools.combinations`` order.
    """
    if not isinstance(bits, int) or bits < 1:
        raise ConfigurationError(f"ring bits must be a positive integer, got {bits!r}")
    n_vars = n_clients + len(_pairs(n_clients))
    q = 1 << bits
    rows = q**n_vars
    if rows > MAX_ENUMERATION:
        raise ConfigurationError(
            f"{n_clients} clients over Z_{q} need {rows} mask assignments; the exhaustive check "
            f"is limited to {MAX_ENUMERATION}"
        )
    grid = np.indices((q,) * n_vars, dtype=np.int64)
    return grid.reshape(n_vars, rows).T.copy()


class _ViewModel:
    """The view as a linear function of (inputs, masks), coded as one integer per mask row."""

    def __init__(self, scenario: Scenario, bits: int) -> None:
        self.q = 1 << bits
        n = scenario.n_clients
        masks = enumerate_masks(n, bits)
        pairs = _pairs(n)
        pair_col = {pair: n + i for i, pair in enumerate(pairs)}
        senders = sorted(scenario.sent)
        # Mask part of each y_u; the input is added per input tuple.
        mask_parts: list[IntArray] = []
        for u in senders:
            total = masks[:, u].copy()
            for v in range(n):
                if v > u:
                    total += masks[:, pair_col[(u, v)]]
                elif v < u:
                    total -= masks[:, pair_col[(v, u)]]
            mask_parts.append(total % self.q)
        revealed_cols = sorted(scenario.self_masks_revealed)
        revealed_cols += sorted(
            {
                pair_col[p]
                for p in pairs
                if p[0] in scenario.keys_revealed or p[1] in scenario.keys_revealed
            }
        )
        # A view is coded as one integer, ``bits`` bits per component (q is a power of two, so
        # shifts and ORs replace a mixed-radix product). The revealed secrets do not depend on
        # the input, so their part of the code is computed once; the part of sender u's y_u is
        # tabulated for each of the q possible inputs x_u.
        n_components = len(revealed_cols) + len(senders)
        self.n_cells = self.q**n_components
        self.revealed_code: IntArray = np.zeros(masks.shape[0], dtype=np.int64)
        for position, col in enumerate(revealed_cols):
            self.revealed_code |= masks[:, col] << (bits * position)
        y_shift = bits * len(revealed_cols)
        self.y_codes: dict[int, list[IntArray]] = {
            u: [
                ((y_mask + value) & (self.q - 1)) << (y_shift + bits * position)
                for value in range(self.q)
            ]
            for position, (u, y_mask) in enumerate(zip(senders, mask_parts, strict=True))
        }
        self.mask_assignments = int(masks.shape[0])

    def distribution(self, inputs: Sequence[int]) -> IntArray:
        """A canonical form of the exact view distribution over all mask assignments.

        Either the histogram (count of mask assignments per view) or the sorted view codes:
        both determine the multiset of views, so equal arrays mean equal distributions. The
        form depends only on the scenario, so arrays of one scenario are always comparable.
        """
        codes = self.revealed_code.copy()
        for u, table in self.y_codes.items():
            codes |= table[inputs[u] % self.q]
        if self.n_cells <= MAX_TABLE:
            return np.bincount(codes, minlength=self.n_cells).astype(np.int64)
        return np.sort(codes)


@dataclass(frozen=True)
class EnumerationResult:
    """Outcome of one exhaustive check."""

    scenario: Scenario
    bits: int
    input_tuples: int
    mask_assignments: int
    distinct_sums: int
    #: Two input tuples with the same revealed sum whose views are distributed differently
    #: (None when there is none: the view reveals nothing beyond the sum).
    same_sum_counterexample: tuple[tuple[int, ...], tuple[int, ...]] | None
    #: Two revealed sums whose view distributions coincide (None when every sum is
    #: distinguishable, i.e. the check could detect a difference).
    indistinguishable_sums: tuple[int, int] | None

    @property
    def reveals_only_the_sum(self) -> bool:
        return self.same_sum_counterexample is None

    def summary(self) -> str:
        verdict = (
            "view depends on the inputs only through their sum"
            if self.reveals_only_the_sum
            else f"view separates equal-sum inputs {self.same_sum_counterexample}"
        )
        power = (
            "every pair of different sums is distinguishable"
            if self.indistinguishable_sums is None
            else f"sums {self.indistinguishable_sums} give the same view distribution"
        )
        return (
            f"{self.scenario.name}: Z_{1 << self.bits}, {self.scenario.n_clients} clients, "
            f"{self.input_tuples} input tuples x {self.mask_assignments} mask assignments, "
            f"{self.distinct_sums} sums: {verdict}; {power}"
        )


def check_scenario(scenario: Scenario, bits: int = 3) -> EnumerationResult:
    """Compare the exact view distributions of every input tuple, grouped by revealed sum."""
    model = _ViewModel(scenario, bits)
    q = model.q
    representative: dict[int, tuple[tuple[int, ...], IntArray]] = {}
    counterexample: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    tuples = 0
    for inputs in itertools.product(range(q), repeat=scenario.n_clients):
        tuples += 1
        total = sum(inputs[u] for u in scenario.sent) % q
        dist = model.distribution(inputs)
        if total not in representative:
            representative[total] = (inputs, dist)
        elif counterexample is None and not np.array_equal(dist, representative[total][1]):
            counterexample = (representative[total][0], inputs)
    indistinguishable: tuple[int, int] | None = None
    for s1, s2 in itertools.combinations(sorted(representative), 2):
        if np.array_equal(representative[s1][1], representative[s2][1]):
            indistinguishable = (s1, s2)
            break
    return EnumerationResult(
        scenario=scenario,
        bits=bits,
        input_tuples=tuples,
        mask_assignments=model.mask_assignments,
        distinct_sums=len(representative),
        same_sum_counterexample=counterexample,
        indistinguishable_sums=indistinguishable,
    )


def standard_scenarios(n_clients: int = 3) -> list[Scenario]:
    """The honest executions (no dropout; the last client dropped) and the forbidden one."""
    return [
        honest_scenario(n_clients),
        honest_scenario(n_clients, dropped=[n_clients - 1]),
        both_shares_scenario(n_clients, victim=0),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per scenario; exit non-zero if an honest scenario leaks more than the sum."""
    parser = argparse.ArgumentParser(prog="python -m proofs.toy_enumeration", description=__doc__)
    parser.add_argument("--bits", type=int, default=3, help="ring Z_{2^bits} (default 3: Z_8)")
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args(argv)
    ok = True
    for scenario in standard_scenarios(args.clients):
        result = check_scenario(scenario, args.bits)
        print(result.summary())
        if scenario.follows_protocol and not result.reveals_only_the_sum:
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

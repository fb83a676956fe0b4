"""What every attack returns: the tokens it names and, where it can, ordered sequences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reconstruction:
    """An attack's output.

    ``tokens`` is the set of token ids the attack claims were in the victim's text.
    ``sequences`` are ordered reconstructions; an attack that recovers no order returns its
    tokens as one sequence in score order, which ROUGE-L then (rightly) scores low.
    ``detail`` says in words why the attack stopped where it did (for example "span is full
    rank: membership test carries no information").
    """

    tokens: frozenset[int]
    sequences: tuple[tuple[int, ...], ...]
    detail: str

    @classmethod
    def nothing(cls, detail: str) -> Reconstruction:
        return cls(frozenset(), (), detail)

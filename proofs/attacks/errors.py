"""Errors of the attack suite: an input the attacks cannot work with, said plainly."""

from __future__ import annotations


class AttackError(Exception):
    """Base class of every error raised by :mod:`proofs.attacks`."""


class AttackInputError(AttackError, ValueError):
    """An update, model or text the attack cannot use (missing tensor, wrong shape, empty)."""

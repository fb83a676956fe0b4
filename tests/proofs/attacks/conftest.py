"""One small scenario shared by the attack tests: the embedded tiny Llama and two institutions.

Torch runs single-threaded in these modules (restored after each): the model is tiny, and with
the suite's other processes on the same two cores, multi-threaded BLAS spends most of its time
spinning (a 30x slowdown measured under load).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from proofs.attacks.matrix import MatrixConfig, MatrixRow, Scenario, default_scenario, run_matrix


@contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def scenario() -> Scenario:
    with one_thread():
        return default_scenario(n_clients=2, seed=0)


@pytest.fixture(scope="session")
def batch_one_rows(scenario: Scenario) -> dict[tuple[str, str], MatrixRow]:
    """Every fast attack on every view, batch of one text, two clients (victim = client 0)."""
    config = MatrixConfig(
        batches=(1,),
        clients=(2,),
        attacks=("token_leakage", "token_leakage_lora", "span", "span_lora"),
    )
    with one_thread():
        return {(r.attack, r.view): r for r in run_matrix(scenario, config)}

"""Split learning in one process: the client parts go through the federation's secure sum."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from clients.data import alpaca_example, tokenize
from clients.model_factory import TinyLlamaSpec, build_default_base
from clients.split.trainer import SplitOptions, split_federation
from clients.synthetic import make_federation
from clients.trainer import LoraModel, LoraSettings, TrainSettings
from fl_core.aggregation import CkksBackend, MaskingBackend
from fl_core.federation import DpSettings, Federation, FederationConfig, SecAggSettings
from fl_core.split import NotYourTurn, SplitSpec
from secagg.transcript import Transcript

SPEC = TinyLlamaSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
STEPS, BATCH, LR = 2, 4, 0.01


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _federation(
    backend: str = "masking", dp: DpSettings | None = None, rounds: int = 2
) -> tuple[Federation, object]:
    fed_data = make_federation(3, 12, 4, seed=2)
    base, tok = build_default_base(fed_data.corpus(), SPEC, vocab_size=300)
    train = {
        i.name: tokenize([alpaca_example(r) for r in i.records], tok, 96, i.name)
        for i in fed_data.institutions
    }
    test = {
        "all": tokenize([alpaca_example(r) for r in fed_data.test_sets["cardiology"]], tok, 96, "t")
    }
    config = FederationConfig(
        clients=tuple(sorted(train)),
        rounds=rounds,
        secagg=SecAggSettings(clip=2 * LR * STEPS),
        dp=dp,
        seed=1,
        backend=backend,
    )
    settings = TrainSettings(local_steps=STEPS, batch_size=BATCH, lr=LR, num_threads=None)
    lm = LoraModel(base, LoraSettings(rank=2, alpha=4))
    return split_federation(
        lm, int(tok.pad_token_id), train, test, config, settings, SplitOptions(SplitSpec(1, 0)), 96
    )


def test_client_parts_are_averaged_by_the_secure_sum_within_its_bound() -> None:
    fed, trainer = _federation()
    assert isinstance(fed.backend, MaskingBackend)
    server_before = trainer.middle.vector()  # type: ignore[attr-defined]
    outcomes = fed.run()
    for outcome in outcomes:
        m = outcome.metrics
        assert m.contributors == m.cohort
        assert 0 < m.secure_vs_plain_max_abs_diff <= m.quantization_bound
        assert isinstance(outcome.transcript, Transcript)
    # The secure sum carries the client part only; the server part stayed on the server.
    assert fed.dim == trainer.client.layout.client.size  # type: ignore[attr-defined]
    assert np.abs(trainer.middle.vector() - server_before).max() > 0  # type: ignore[attr-defined]
    assert trainer.middle.traffic.steps == {1: STEPS, 2: STEPS, 3: STEPS}  # type: ignore[attr-defined]
    assert np.isfinite(outcomes[-1].metrics.eval_loss_mean)


def test_a_dropout_trains_but_is_not_in_the_sum() -> None:
    fed, trainer = _federation(rounds=1)
    name = fed.config.clients[1]
    steps_before = dict(trainer.middle.traffic.steps)  # type: ignore[attr-defined]
    outcome = fed.run_round(0, dropouts=[name])
    assert name not in outcome.metrics.contributors and len(outcome.metrics.contributors) == 2
    assert steps_before == {}
    assert trainer.middle.traffic.steps == {1: STEPS, 2: STEPS, 3: STEPS}  # type: ignore[attr-defined]


def test_turns_follow_the_schedule() -> None:
    fed, trainer = _federation(rounds=1)
    update = trainer.train  # type: ignore[attr-defined]
    options = fed.strategy.client_options()
    with pytest.raises(NotYourTurn):  # the third institution before the first
        update(fed.config.clients[2], 0, fed.global_vector, options)


def test_split_with_distributed_dp_and_with_ckks() -> None:
    dp_fed, _ = _federation(dp=DpSettings(epsilon=8.0), rounds=1)
    dp_outcome = dp_fed.run_round(0)
    assert dp_outcome.metrics.dp is not None and dp_fed.calibration is not None
    ckks_fed, _ = _federation(backend="ckks", rounds=1)
    assert isinstance(ckks_fed.backend, CkksBackend)
    m = ckks_fed.run_round(0).metrics
    assert m.backend == "ckks" and m.secure_vs_plain_max_abs_diff <= m.quantization_bound

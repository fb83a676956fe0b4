"""The embedded federation: seeded, non-IID as stated, with held-out phrasings per domain."""

from __future__ import annotations

import pytest

from clients.synthetic import DOMAINS, SyntheticConfigError, make_federation


def test_same_seed_same_data_different_seed_different_data() -> None:
    assert make_federation(seed=3) == make_federation(seed=3)
    assert make_federation(seed=3).institutions != make_federation(seed=4).institutions


def test_institutions_specialise_with_the_stated_share() -> None:
    fed = make_federation(num_institutions=6, records_per_institution=100, own_domain_share=0.9)
    assert len(DOMAINS) >= 4 and len(fed.institutions) == 6
    assert [i.domain for i in fed.institutions] == [DOMAINS[i % len(DOMAINS)] for i in range(6)]
    for inst in fed.institutions:
        assert len(inst.records) == len(inst.record_domains) == 100
        assert inst.record_domains.count(inst.domain) == 90
        assert set(inst.record_domains) - {inst.domain} <= set(DOMAINS)


def test_test_sets_are_held_out_phrasings_of_trained_facts() -> None:
    fed = make_federation(records_per_institution=400)
    train = {(r.instruction, r.output) for i in fed.institutions for r in i.records}
    train_questions = {q for q, _ in train}
    for domain in DOMAINS:
        test = fed.test_sets[domain]
        assert len(test) == 48
        assert not {r.instruction for r in test} & train_questions
        # Every entity asked about in the test set is described somewhere in training.
        for r in test:
            entity = r.output.split(" ")[0].rstrip(":").lower()
            assert any(entity in out.lower() for _, out in train)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(SyntheticConfigError, match="own_domain_share"):
        make_federation(own_domain_share=0.0)
    with pytest.raises(SyntheticConfigError):
        make_federation(num_institutions=0)

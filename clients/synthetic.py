"""The embedded non-IID federation: institutions that each specialise in one domain.

Four domains (cardiology, paediatrics, retail banking, fraud) each have their own vocabulary and
a fixed table of facts (entity -> attribute values). An example asks about one entity with one
of the domain's question templates and answers with the entity's facts, so a model can only
answer well if it has seen that domain's facts. Institution ``i`` specialises in domain
``i mod 4``: a share ``own_domain_share`` (default 90%) of its records come from its own domain,
the rest uniformly from the others. Held-out test sets per domain use (template, entity) pairs
that no institution trains on, so they measure recall of facts in new phrasings, not copying.

Why federation helps: each institution sees a domain's facts almost only if it specialises in
it, so a model trained alone does clearly worse on the other domains' test sets than a model
trained on all institutions' data. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

from clients.data import AlpacaRecord, alpaca_prompt
from fl_core.errors import FLError


class SyntheticConfigError(FLError, ValueError):
    """Parameters for which the synthetic federation cannot be generated."""


@dataclass(frozen=True)
class _Domain:
    name: str
    entities: tuple[str, ...]
    # attribute name -> possible values; each entity gets one value per attribute.
    attributes: tuple[tuple[str, tuple[str, ...]], ...]
    # (instruction template, answer template); both may use {entity}, answers use attributes.
    templates: tuple[tuple[str, str], ...]
    contexts: tuple[str, ...]


_DOMAINS: tuple[_Domain, ...] = (
    _Domain(
        "cardiology",
        (
            "atenolol",
            "lisinopril",
            "warfarin",
            "amiodarone",
            "digoxin",
            "ramipril",
            "clopidogrel",
            "furosemide",
            "diltiazem",
            "spironolactone",
            "bisoprolol",
            "apixaban",
        ),
        (
            (
                "use",
                (
                    "atrial fibrillation",
                    "hypertension",
                    "heart failure",
                    "angina",
                    "ventricular arrhythmia",
                    "stroke prevention",
                ),
            ),
            ("dose", ("2.5 mg", "5 mg", "10 mg", "25 mg", "40 mg", "100 mg")),
            (
                "monitor",
                (
                    "potassium",
                    "INR",
                    "heart rate",
                    "renal function",
                    "blood pressure",
                    "thyroid function",
                ),
            ),
        ),
        (
            (
                "Which cardiac condition is {entity} prescribed for?",
                "{entity} is prescribed for {use}; check {monitor}.",
            ),
            (
                "What is the usual daily dose of {entity}?",
                "The usual dose of {entity} is {dose} daily for {use}.",
            ),
            (
                "What must the cardiologist monitor on {entity}?",
                "On {entity} the cardiologist monitors {monitor}.",
            ),
            (
                "Summarise the cardiology protocol for {entity}.",
                "{entity}: {dose} daily for {use}, monitor {monitor}.",
            ),
        ),
        ("ECG shows sinus rhythm.", "Echo ejection fraction 45 percent.", "Troponin negative.", ""),
    ),
    _Domain(
        "paediatrics",
        (
            "measles vaccine",
            "rotavirus vaccine",
            "hepatitis B vaccine",
            "polio vaccine",
            "varicella vaccine",
            "pertussis booster",
            "crawling",
            "first words",
            "walking",
            "teething",
            "sitting unaided",
            "pincer grasp",
        ),
        (
            (
                "age",
                (
                    "birth",
                    "two months",
                    "six months",
                    "nine months",
                    "twelve months",
                    "eighteen months",
                ),
            ),
            (
                "note",
                (
                    "give with paracetamol advice",
                    "check growth chart",
                    "reassure the parents",
                    "record in the red book",
                    "offer a catch-up visit",
                    "screen for anaemia",
                ),
            ),
            (
                "ward",
                (
                    "neonatal unit",
                    "toddler clinic",
                    "infant clinic",
                    "school nurse",
                    "health visitor",
                    "family practice",
                ),
            ),
        ),
        (
            (
                "At what age is {entity} expected in a child?",
                "{entity} is expected at {age}; {note}.",
            ),
            ("Which paediatric team handles {entity}?", "The {ward} handles {entity} at {age}."),
            (
                "What should the paediatrician note about {entity}?",
                "For {entity} the paediatrician should {note}.",
            ),
            ("Give the paediatric plan for {entity}.", "{entity}: at {age}, {ward}, {note}."),
        ),
        ("Infant weight on the 50th centile.", "Mother asks about fever.", "Toddler is well.", ""),
    ),
    _Domain(
        "retail banking",
        (
            "easy saver account",
            "fixed bond",
            "current account",
            "junior ISA",
            "mortgage",
            "personal loan",
            "credit card",
            "overdraft",
            "cash ISA",
            "business account",
            "regular saver",
            "student account",
        ),
        (
            (
                "rate",
                (
                    "0.5 percent",
                    "1.9 percent",
                    "3.2 percent",
                    "4.75 percent",
                    "6.9 percent",
                    "19.9 percent",
                ),
            ),
            (
                "fee",
                (
                    "no monthly fee",
                    "a 5 pound monthly fee",
                    "a 1 percent arrangement fee",
                    "a 25 pound exit fee",
                    "a 2 pound daily charge",
                    "a 12 pound annual fee",
                ),
            ),
            (
                "channel",
                (
                    "branch",
                    "mobile app",
                    "telephone banking",
                    "online banking",
                    "relationship manager",
                    "post office",
                ),
            ),
        ),
        (
            (
                "What interest rate does the {entity} pay or charge?",
                "The {entity} has a rate of {rate} with {fee}.",
            ),
            ("Are there fees on the {entity}?", "The {entity} comes with {fee}."),
            ("How can a customer open the {entity}?", "Open the {entity} through the {channel}."),
            (
                "Describe the {entity} product terms.",
                "{entity}: {rate}, {fee}, opened via {channel}.",
            ),
        ),
        (
            "Customer is a sole account holder.",
            "Customer salary paid monthly.",
            "Joint application.",
            "",
        ),
    ),
    _Domain(
        "fraud",
        (
            "card not present spike",
            "new payee at night",
            "SIM swap",
            "mule account inflow",
            "phishing link click",
            "rapid small withdrawals",
            "device fingerprint change",
            "overseas login",
            "invoice redirection",
            "account takeover",
            "chargeback cluster",
            "synthetic identity",
        ),
        (
            (
                "risk",
                (
                    "low risk",
                    "medium risk",
                    "high risk",
                    "critical risk",
                    "elevated risk",
                    "watchlist risk",
                ),
            ),
            (
                "action",
                (
                    "block the card",
                    "call the customer",
                    "freeze outgoing payments",
                    "file a suspicious activity report",
                    "step up authentication",
                    "escalate to the fraud desk",
                ),
            ),
            (
                "signal",
                (
                    "velocity rule",
                    "geolocation mismatch",
                    "behavioural biometrics",
                    "network graph alert",
                    "merchant category alert",
                    "device reputation",
                ),
            ),
        ),
        (
            ("How risky is a {entity} alert?", "A {entity} alert is {risk}; {action}."),
            ("What should an analyst do on {entity}?", "On {entity} the analyst should {action}."),
            ("Which detector raises {entity}?", "{entity} is raised by the {signal}."),
            (
                "Write the fraud playbook entry for {entity}.",
                "{entity}: {risk}, {signal}, {action}.",
            ),
        ),
        ("Alert score 0.93.", "Customer travelling abroad.", "Merchant is new.", ""),
    ),
)

DOMAINS: tuple[str, ...] = tuple(d.name for d in _DOMAINS)
#: Seed of the fact tables. Fixed, not per run: facts are the world the institutions describe.
_WORLD_SEED = 20240601


@dataclass(frozen=True)
class Institution:
    name: str
    domain: str
    records: tuple[AlpacaRecord, ...]
    record_domains: tuple[str, ...]  # the domain each record was drawn from


@dataclass(frozen=True)
class SyntheticFederation:
    institutions: tuple[Institution, ...]
    test_sets: dict[str, tuple[AlpacaRecord, ...]]  # per domain
    own_domain_share: float
    #: Per institution: held-out records drawn like its training data (its own domain mix),
    #: from the held-out (template, entity) pairs, so each institution can be scored on its own
    #: distribution rather than on the union of all domains.
    institution_test_sets: dict[str, tuple[AlpacaRecord, ...]] = field(default_factory=dict)

    def corpus(self) -> Iterator[str]:
        """All text (for training the tokenizer): prompts and answers, train and test."""
        # Not the institutions' own held-out sets: they reuse the domains' words, and leaving them
        # out keeps the tokenizer (and so the embedded model) independent of their size.
        for records in [i.records for i in self.institutions] + list(self.test_sets.values()):
            for r in records:
                yield alpaca_prompt(r.instruction, r.input) + r.output


@cache
def _facts(domain: _Domain) -> dict[str, dict[str, str]]:
    rng = random.Random(f"{_WORLD_SEED}:{domain.name}")
    return {
        entity: {attr: rng.choice(values) for attr, values in domain.attributes}
        for entity in domain.entities
    }


def _is_test_pair(domain: _Domain, template: int, entity: int) -> bool:
    # Each entity has exactly one template held out, and it rotates across entities, so every
    # fact is seen in training and every test question is a new phrasing of a known fact.
    return template == entity % len(domain.templates)


def _sample(domain: _Domain, rng: random.Random, test: bool) -> AlpacaRecord:
    facts = _facts(domain)
    pairs = [
        (t, e)
        for t in range(len(domain.templates))
        for e in range(len(domain.entities))
        if _is_test_pair(domain, t, e) == test
    ]
    t, e = rng.choice(pairs)
    entity = domain.entities[e]
    question, answer = domain.templates[t]
    values = {"entity": entity, **facts[entity]}
    text = answer.format(**values)
    return AlpacaRecord(
        question.format(**values), rng.choice(domain.contexts), text[0].upper() + text[1:]
    )


def make_federation(
    num_institutions: int = 4,
    records_per_institution: int = 160,
    test_records_per_domain: int = 48,
    own_domain_share: float = 0.9,
    seed: int = 0,
    test_records_per_institution: int = 0,
) -> SyntheticFederation:
    """Generate the institutions' training records, one held-out test set per domain and, when
    ``test_records_per_institution`` > 0, one per institution drawn from its own domain mix
    (from a separate generator: the other records do not depend on it)."""
    if num_institutions < 1 or records_per_institution < 1 or test_records_per_domain < 1:
        raise SyntheticConfigError(
            "num_institutions, records_per_institution and test_records_per_domain must be >= 1"
        )
    if not 0.0 < own_domain_share <= 1.0:
        raise SyntheticConfigError(f"own_domain_share={own_domain_share} is not in (0, 1]")
    rng = random.Random(seed)
    institutions = []
    for i in range(num_institutions):
        own = _DOMAINS[i % len(_DOMAINS)]
        others = [d for d in _DOMAINS if d is not own]
        n_own = round(own_domain_share * records_per_institution)
        drawn = [own] * n_own + [rng.choice(others) for _ in range(records_per_institution - n_own)]
        rng.shuffle(drawn)
        records = tuple(_sample(d, rng, test=False) for d in drawn)
        name = f"{own.name.replace(' ', '-')}-{i // len(_DOMAINS) + 1}"
        institutions.append(Institution(name, own.name, records, tuple(d.name for d in drawn)))
    test_rng = random.Random(f"test:{seed}")
    test_sets = {
        d.name: tuple(_sample(d, test_rng, test=True) for _ in range(test_records_per_domain))
        for d in _DOMAINS
    }
    own_tests: dict[str, tuple[AlpacaRecord, ...]] = {}
    for i, institution in enumerate(institutions):
        own_rng = random.Random(f"institution-test:{seed}:{i}")
        own = _DOMAINS[i % len(_DOMAINS)]
        others = [d for d in _DOMAINS if d is not own]
        own_tests[institution.name] = tuple(
            _sample(own if own_rng.random() < own_domain_share else own_rng.choice(others),
                    own_rng, test=True)
            for _ in range(test_records_per_institution)
        )  # fmt: skip
    if test_records_per_institution < 1:
        own_tests = {}
    return SyntheticFederation(tuple(institutions), test_sets, own_domain_share, own_tests)

"""The embedded default federation: one frozen config that ``fedsec simulate`` runs without flags.

Sized so that the whole federated run trains visibly (each institution's eval loss falling every
few rounds) in about two minutes on 2 CPU cores. The training recipe (LoRA shape, batch size,
learning rate, local steps, strategy) is :data:`fl_core.recipe.EMBEDDED`, the one place it is
set; the module-level names below are views of it and of :data:`DEFAULTS`, kept so callers can
write ``defaults.ROUNDS``; change values in one place only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clients.model_factory import TinyLlamaSpec
from fl_core.recipe import EMBEDDED, Recipe

#: The LoRA mode of the embedded recipe was chosen by benchmarks/lora_modes.py (plaintext FedAvg,
#: 4 institutions x 8 rounds x 10 steps, same seeds; mean eval loss on the union of the domains'
#: test sets): plain 3.69 at lr 0.01 (3.86 at 0.03) versus FFA-LoRA 4.10 at lr 0.03 (4.70 at
#: 0.01). Plain's cost is an inexact average: ||mean(B)mean(A) - mean(BA)|| is 4.7% of
#: ||mean(BA)|| at lr 0.01 (15% at 0.03). FFA-LoRA stays available (exact average) via
#: lora_mode="ffa".


@dataclass(frozen=True)
class SimulationDefaults:
    institutions: int = 4
    rounds: int = 8
    seed: int = 0
    recipe: Recipe = EMBEDDED
    records_per_institution: int = 160
    test_records_per_domain: int = 48
    #: Each institution's own held-out set (drawn like its training data).
    test_records_per_institution: int = 48
    #: Held-out questions per institution answered by generation before and after training.
    generate_per_institution: int = 4
    own_domain_share: float = 0.9
    model: TinyLlamaSpec = field(default_factory=TinyLlamaSpec)
    # Distributed DP, when enabled: per-client L2 clip of the update and the target delta.
    dp_clip: float = 1.0
    dp_delta: float = 1e-5


DEFAULTS = SimulationDefaults()

INSTITUTIONS = DEFAULTS.institutions
ROUNDS = DEFAULTS.rounds
SEED = DEFAULTS.seed
LOCAL_STEPS = DEFAULTS.recipe.local_steps or 1
BATCH_SIZE = DEFAULTS.recipe.batch_size
LR = DEFAULTS.recipe.lr
STRATEGY = DEFAULTS.recipe.strategy
LORA_RANK = DEFAULTS.recipe.lora_rank
LORA_ALPHA = DEFAULTS.recipe.lora_alpha
LORA_MODE = DEFAULTS.recipe.lora_mode
MAX_LENGTH = DEFAULTS.recipe.max_length
RECORDS_PER_INSTITUTION = DEFAULTS.records_per_institution
TEST_RECORDS_PER_DOMAIN = DEFAULTS.test_records_per_domain
TEST_RECORDS_PER_INSTITUTION = DEFAULTS.test_records_per_institution
GENERATE_PER_INSTITUTION = DEFAULTS.generate_per_institution
OWN_DOMAIN_SHARE = DEFAULTS.own_domain_share
MODEL = DEFAULTS.model
DP_CLIP = DEFAULTS.dp_clip
DP_DELTA = DEFAULTS.dp_delta

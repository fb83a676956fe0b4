"""``fedsec simulate``'s library half: the local training of every institution in one process
(:class:`TorchTrainer`, :class:`SplitRunTrainer`) and the federation of a spec (:func:`prepare`).

The federation itself is :class:`fl_core.federation.Federation` (the round core); this module
supplies what needs torch: local training (SFT or DPO, the stage's objective each round),
evaluation and the adapter. :mod:`clients.simulate_cli` is the CLI around it; benchmarks and the
Flower example import this module, not the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from clients.dpo import (
    DpoConfigError,
    DpoSettings,
    PairLogps,
    PreferenceScore,
    pair_logps,
    score_preferences,
    train_dpo,
)
from clients.split.trainer import SplitTrainer, split_federation
from clients.trainer import (
    ScaffoldControls,
    TrainingConfigError,
    TrainSettings,
    evaluate,
    train_local,
)
from clients.workload import SimulationSpec, Workload, build_workload
from fl_core.dp_guidance import NoiseGuidance, cohort_calibrator, guidance
from fl_core.federation import (
    ClientUpdate,
    Federation,
    FederationConfig,
    SecAggSettings,
    choose_graph,
)
from fl_core.recipe import Recipe
from fl_core.run_dir import (
    RunDirectoryError,
)
from fl_core.strategies import ClientOptions
from secagg.params import release_floor

#: The name of the pooled preference score beside the institutions'.
POOLED = "pooled"


@dataclass
class TorchTrainer:
    """Local LoRA training of every institution on one shared model (clients run in turn).

    ``settings`` is the template of every client's round (its lr is the default one);
    ``lr_at(round)`` gives a round's scheduled lr when the strategy does not set one. With a
    recipe, each round trains its stage's objective (:meth:`Recipe.objective_at`): SFT on the
    institution's examples or DPO on its pairs. ``dpo_start`` is the global vector the DPO stage
    started from: the reference of ``dpo_reference = "sft"`` and of the held-out preference
    scores.
    """

    work: Workload
    settings: TrainSettings
    seed: int
    controls: dict[str, np.ndarray] = field(default_factory=dict)  # SCAFFOLD c_i per client
    batches_drawn: dict[str, int] = field(default_factory=dict)  # per client, all rounds so far
    rounds: int | None = None  # with a recipe: the lr schedule runs over this many rounds
    recipe: Recipe | None = None
    pair_batches_drawn: dict[str, int] = field(default_factory=dict)  # DPO batches, per client
    dpo_start: np.ndarray | None = None
    _reference_scores: dict[str, PairLogps] = field(default_factory=dict)

    def round_lr(self, round_index: int) -> float:
        if self.recipe is None or self.rounds is None:
            return self.settings.lr
        return self.recipe.lr_at(round_index, self.rounds)

    def objective(self, round_index: int) -> str:
        if self.recipe is None or self.rounds is None:
            return "sft"
        return self.recipe.objective_at(round_index, self.rounds)

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        index = sorted(self.work.train_sets).index(client)
        dpo = self.objective(round_index) == "dpo"
        drawn = self.pair_batches_drawn if dpo else self.batches_drawn
        settings = replace(
            self.settings,
            lr=options.lr if options.lr is not None else self.round_lr(round_index),
            # One data order per client, reproducible from the run seed, continued across
            # rounds (see TrainSettings): each example once per epoch of the client's data.
            seed=self.seed * 1_000_003 + index,
            data_offset=drawn.get(client, 0),
            prox_mu=options.prox_mu,
        )
        scaffold = None
        if options.server_control is not None:
            mine = self.controls.get(client, np.zeros_like(options.server_control))
            scaffold = ScaffoldControls(options.server_control, mine)
        if dpo:
            if self.recipe is None:
                raise DpoConfigError("a DPO round needs the run's recipe")
            self.begin_dpo(global_vector)
            result = train_dpo(
                self.work.lm,
                global_vector,
                self.work.pair_train[client],
                settings,
                DpoSettings.from_recipe(self.recipe),
                self.work.pad_id,
                self.dpo_start if self.recipe.dpo_reference == "sft" else None,
                scaffold,
            )
        else:
            result = train_local(
                self.work.lm,
                global_vector,
                self.work.train_sets[client],
                settings,
                self.work.pad_id,
                scaffold,
            )
        drawn[client] = drawn.get(client, 0) + result.steps
        if result.new_client_control is not None:
            self.controls[client] = result.new_client_control
        return ClientUpdate(
            result.delta, result.num_samples, result.mean_loss, result.control_delta
        )

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return evaluate(self.work.lm, vector, self.work.test_sets, self.work.pad_id)

    def begin_dpo(self, vector: np.ndarray) -> None:
        """The DPO stage starts from ``vector`` (once; later calls keep the first)."""
        if self.dpo_start is not None:
            return
        if not self.work.pair_train:
            raise DpoConfigError("a DPO stage needs the institutions' preference pairs")
        self.dpo_start = vector.astype(np.float32).copy()

    def preference_scores(self, vector: np.ndarray) -> dict[str, PreferenceScore]:
        """Each institution's held-out pairs under ``vector`` against the DPO stage's start, and
        the pooled score over their union (:data:`POOLED`)."""
        if self.recipe is None or self.dpo_start is None:
            raise DpoConfigError("preference scores need a DPO stage that has started")
        work, beta = self.work, self.recipe.dpo_beta
        if not self._reference_scores:
            self._reference_scores = {
                n: pair_logps(work.lm, self.dpo_start, d, work.pad_id)
                for n, d in work.pair_test.items()
            }
        policy = {n: pair_logps(work.lm, vector, d, work.pad_id) for n, d in work.pair_test.items()}
        out = {n: score_preferences(policy[n], self._reference_scores[n], beta) for n in policy}
        names = sorted(policy)
        out[POOLED] = score_preferences(
            PairLogps.concat([policy[n] for n in names]),
            PairLogps.concat([self._reference_scores[n] for n in names]),
            beta,
        )
        return out

    def adapter_tensors(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The full PEFT adapter (A and B) with ``vector`` as its trainable part."""
        self.work.lm.set_vector(vector)
        return self.work.lm.tensors()

    def client_state(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for name in self.work.train_sets:
            arrays = {
                "batches_drawn": np.array([self.batches_drawn.get(name, 0)], np.int64),
                "pair_batches_drawn": np.array([self.pair_batches_drawn.get(name, 0)], np.int64),
            }
            if name in self.controls:
                arrays["control"] = self.controls[name]
            out[name] = arrays
        return out

    def shared_state(self) -> dict[str, np.ndarray]:
        return {} if self.dpo_start is None else {"dpo_start": self.dpo_start}

    def restore(
        self,
        clients: Mapping[str, Mapping[str, np.ndarray]],
        shared: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        for name, arrays in clients.items():
            if name not in self.work.train_sets:
                raise RunDirectoryError(f"run state has an unknown institution {name!r}")
            self.batches_drawn[name] = int(arrays["batches_drawn"][0])
            if "pair_batches_drawn" in arrays:
                self.pair_batches_drawn[name] = int(arrays["pair_batches_drawn"][0])
            if "control" in arrays:
                self.controls[name] = arrays["control"].astype(np.float32)
        if shared and "dpo_start" in shared:
            self.dpo_start = shared["dpo_start"].astype(np.float32)

    def full_vector(self, vector: np.ndarray) -> np.ndarray:
        """The whole trainable adapter of the federation's ``vector`` (the same here)."""
        return vector

    def server_part(self) -> np.ndarray | None:
        """Split training's server part (None: every coordinate is federated)."""
        return None

    def restore_server_part(self, vector: np.ndarray | None) -> None:
        if vector is not None:
            raise RunDirectoryError("the run state holds a split server part; this run is LoRA")


@dataclass
class SplitRunTrainer(TorchTrainer):
    """``--mode split``: the federation's vector is the institutions' part; the server's part
    is trained by :class:`~clients.split.middle.MiddleServer` through ``core``'s steps."""

    core: SplitTrainer | None = None

    def _core(self) -> SplitTrainer:
        if self.core is None:
            raise TrainingConfigError("split mode without its split trainer")
        return self.core

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        lr = options.lr if options.lr is not None else self.round_lr(round_index)
        return self._core().train(client, round_index, global_vector, replace(options, lr=lr))

    def evaluate(self, vector: np.ndarray) -> dict[str, float]:
        return self._core().evaluate(vector)

    def adapter_tensors(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        return self._core().adapter_tensors(vector)

    def full_vector(self, vector: np.ndarray) -> np.ndarray:
        return self._core().full_vector(vector)

    def server_part(self) -> np.ndarray | None:
        return self._core().middle.vector()

    def restore_server_part(self, vector: np.ndarray | None) -> None:
        if vector is None:
            raise RunDirectoryError("the run state holds no split server part to resume from")
        self._core().middle.set_vector(vector.astype(np.float32))

    def client_state(self) -> dict[str, dict[str, np.ndarray]]:
        drawn = self._core().batches_drawn
        return {
            name: {"batches_drawn": np.array([drawn.get(name, 0)], np.int64)}
            for name in self.work.train_sets
        }

    def restore(
        self,
        clients: Mapping[str, Mapping[str, np.ndarray]],
        shared: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if shared:
            raise RunDirectoryError("the run state holds a DPO stage; split mode trains SFT only")
        for name, arrays in clients.items():
            if name not in self.work.train_sets:
                raise RunDirectoryError(f"run state has an unknown institution {name!r}")
            self._core().batches_drawn[name] = int(arrays["batches_drawn"][0])


def default_clip(settings: TrainSettings, strategy: str, steps: int | None = None) -> float:
    """A data-independent bound on a coordinate of a client's contribution.

    AdamW moves a coordinate by about ``lr`` per step and gradient-clipped SGD by at most
    ``lr * max_grad_norm``, so ``2 * lr * steps`` leaves room without tracking the data
    (``steps``: the most steps a client takes in a round; by default ``local_steps``).
    SCAFFOLD also sends the control-variate delta, a mean gradient whose coordinates are bounded
    by the gradient clip plus the difference of two earlier control variates.
    """
    steps = steps or settings.local_steps or 1
    clip = 2.0 * settings.lr * steps * max(1.0, settings.max_grad_norm)
    if strategy == "scaffold":
        clip = max(clip, 4.0 * settings.max_grad_norm)
    return clip


def steps_per_round(recipe: Recipe, sizes: Sequence[int]) -> int:
    """The most optimizer steps any client takes in a round."""
    if recipe.local_steps is not None:
        return recipe.local_steps
    return (recipe.local_epochs or 1) * max(math.ceil(n / recipe.batch_size) for n in sizes)


def prepare(spec: SimulationSpec) -> tuple[Federation, TorchTrainer]:
    """The workload, the trainer and the federation of a spec (nothing has trained yet)."""
    recipe = spec.recipe
    work = build_workload(spec)
    settings = TrainSettings.from_recipe(recipe, lr=recipe.lr, seed=spec.seed)
    trainer = TorchTrainer(work, settings, spec.seed, rounds=spec.rounds, recipe=recipe)
    # Either stage's updates must fit the encoding: its largest lr and step count.
    sizes = [len(d) for d in work.train_sets.values()]
    sizes += [len(d) for d in work.pair_train.values()]
    steps = steps_per_round(recipe, sizes)
    largest = replace(settings, lr=recipe.peak_lr())
    config = FederationConfig(
        clients=tuple(sorted(work.train_sets)),
        rounds=spec.rounds,
        secagg=SecAggSettings(clip=default_clip(largest, recipe.strategy, steps)),
        strategy=recipe.strategy,
        strategy_hparams=recipe.params(),
        dp=spec.dp,
        seed=spec.seed,
        backend=spec.backend,
    )
    if spec.split is not None:
        fed, core = split_federation(
            work.lm,
            work.pad_id,
            work.train_sets,
            work.test_sets,
            config,
            settings,
            spec.split,
            work.max_length,
        )
        split = SplitRunTrainer(
            work, settings, spec.seed, rounds=spec.rounds, recipe=recipe, core=core
        )
        return fed, split
    initial = work.lm.get_vector()
    # A client's weight is its example count in SFT rounds and its pair count in DPO rounds.
    max_samples = max(sizes)
    return Federation(config, trainer, trainer.evaluate, initial, max_samples), trainer


def dp_advice(fed: Federation) -> NoiseGuidance | None:
    """The DP noise-to-signal guidance of ``fed`` (None without DP)."""
    calibration, dp = fed.calibration, fed.config.dp
    if calibration is None or dp is None:
        return None
    settings = fed.config.secagg

    def floor(n: int) -> int:
        return release_floor(n, choose_graph(n, settings).min_release, settings.dropout_fraction)

    at = cohort_calibrator(
        mechanism=dp.mechanism,
        epsilon=dp.epsilon,
        delta=dp.delta,
        participations=fed.config.participations(),
        ring_bits=dp.ring_bits,
        clip=dp.clip,
        dim=fed.strategy.contribution_size(),
        min_release=floor,
    )
    return guidance(
        calibration,
        epsilon=dp.epsilon,
        cohort=fed.config.cohort,
        dim=fed.strategy.contribution_size(),
        calibrate_cohort=at,
    )

"""``fedsec server --config server.toml``: the coordinator's settings, validated on load.

Every refusal names the file and the key (see :mod:`fl_core.toml_config`). Cross-field
rules that would otherwise surface mid-round (a threshold above the cohort, a cohort above the
roster) are checked here, before the server listens.

``[server] workers`` (default: the CPUs this process may run on) is the number of processes
that remove masks and unpack masked inputs (:mod:`server.parallel_unmask`); 1 keeps that work
in the server process.

``[rounds] backend`` selects how the sum is computed: ``"masking"`` (default; pairwise masks,
``ring_bits``/``neighbours``/``threshold``/``corrupt_fraction``/``dropout_fraction`` apply) or
``"ckks"`` (homomorphic encryption; a
``[ckks]`` table names the public context file made by the key dealer and the parameters it
must have). Keys of the other backend are refused as unknown, not silently ignored. The public
context is loaded and checked here (dealer's signature against the roster, fingerprint, no
secret key), so a server that was handed a secret context refuses to start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from fl_core.adapter_io import load_adapter
from fl_core.errors import AdapterFormatError, FLError
from fl_core.federation import DpSettings
from fl_core.recipe import EMBEDDED, BaseKind, Recipe, RecipeError, resolve_table
from fl_core.toml_config import ConfigError, Table, load_toml
from secagg.dp.noise import MECHANISMS, Mechanism
from secagg.encoding import QuantizationParams
from secagg.errors import ConfigurationError
from secagg.keys import Roster
from secagg.params import SessionShape, release_floor, session_shape
from wire.credentials import check_key_pair, load_certificates, load_roster

if TYPE_CHECKING:
    from secagg.he import PublicContext

BACKENDS = ("masking", "ckks")
#: The longest stage or join deadline accepted (one day): longer is a typo, and values near
#: float's range overflow the clock arithmetic.
MAX_TIMEOUT_S = 86_400.0


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    #: When set, clients must also present a certificate issued by this CA (mutual TLS).
    client_ca: Path | None


@dataclass(frozen=True)
class RoundsTable:
    """The `[rounds]` table: how many rounds, of which cohorts, under which protocol limits (each
    round's own configuration, sent to its cohort, is :class:`fl_core.round_config.RoundConfig`)."""

    rounds: int
    cohort_size: int
    min_clients: int
    #: Masking only (0 under ckks): a floor on the Shamir threshold. Each round uses the
    #: larger of it and the active-server threshold for the round's cohort (it can raise the
    #: threshold, never lower it); 0: that threshold.
    threshold: int
    #: Masking only (0 under ckks): bits of the ring Z_{2^b}.
    ring_bits: int
    #: 0: complete graph (classic SecAgg); k > 0: SecAgg+ neighbourhoods of at least k (raised
    #: to the degree an active server cannot exploit for the round's cohort).
    neighbours: int
    stage_timeout_s: float
    #: Also the upload deadline of a ckks round: clients train before they upload.
    join_timeout_s: float
    seed: int
    backend: str = "masking"
    #: The fraction of a cohort assumed to collude with the server, and the dropouts a round is
    #: sized for: they set t, k and the survivor-set quorum (clients check against their own).
    corrupt_fraction: float = 0.05
    dropout_fraction: float = 0.05
    #: Consecutive aborted attempts of one round before the federation stops with the reason.
    max_attempts: int = 5

    def dp_floor(self, cohort: int) -> int:
        """With DP, the fewest contributors a round of ``cohort`` may release: the noise is
        calibrated for them (``secagg.params.release_floor`` over t and the quorum)."""
        return release_floor(cohort, self.session_shape(cohort).min_release, self.dropout_fraction)

    def session_shape(self, cohort: int) -> SessionShape:
        """The threshold, graph and quorum of a round over ``cohort`` clients."""
        return session_shape(
            cohort,
            self.corrupt_fraction,
            self.dropout_fraction,
            neighbours=self.neighbours or None,
            min_threshold=self.threshold,
        )


@dataclass(frozen=True)
class CkksConfig:
    """``[ckks]``: the federation's public context and the parameters it must have.

    ``min_contributors`` is the smallest sum released: fewer uploads abort the round, and a
    decryptor refuses to open an aggregate that claims fewer.
    """

    public_context_path: Path
    public: PublicContext
    min_contributors: int


@dataclass(frozen=True)
class SplitServerConfig:
    """``[split]`` of a ``kind = "split"`` task: where the model is cut and how the server runs
    its blocks (:mod:`server.split_service`).

    ``base`` is the base model the server builds (``"embedded"``: the seeded tiny Llama with a
    tokenizer trained on the synthetic federation ``institutions``/``records``/
    ``federation_seed``, as the institutions' ``[train]`` tables say; otherwise a named model or
    a model directory); the initial adapter's tensors are loaded into it. ``max_length`` bounds
    every step tensor's rows (tokens) together with the recipe's ``batch_size``;
    ``step_timeout_s`` is each step message's deadline; ``server_lr`` defaults to the recipe's.
    """

    client_bottom: int = 1
    client_top: int = 0
    base: str = "embedded"
    institutions: int = 4
    records: int = 160
    federation_seed: int = 0
    max_length: int = 256
    step_timeout_s: float = 30.0
    server_lr: float | None = None
    threads: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class TaskConfig:
    """What clients compute each round.

    ``random``: a pseudo-random pre-quantized update of ``dim`` coordinates (load tests,
    drills; no model). ``train``: local LoRA training from the global adapter, starting from
    the PEFT adapter ``initial_adapter``; the server applies the recipe's strategy to the
    released sum and sends each round the recipe's coordinator settings (``lr`` on its
    schedule, ``local_steps`` or ``local_epochs``, ``batch_size``, ``optimizer``,
    ``max_grad_norm``; :mod:`fl_core.recipe`, the ``round`` fields). Its defaults are the
    embedded model's when the adapter names no base, a pretrained base's otherwise.
    ``split``: as ``train``, but the institutions train only their part of the adapter through
    split steps with the server (``[split]``, :class:`SplitServerConfig`) and the secure sum
    carries that part.
    """

    kind: str
    dim: int
    clip: float
    initial_adapter: Path | None = None
    recipe: Recipe = EMBEDDED
    max_weight: int = 1000
    split: SplitServerConfig | None = None

    @property
    def lora_mode(self) -> str:
        return self.recipe.lora_mode

    @property
    def trains(self) -> bool:
        """Whether clients train a model (``train`` or ``split``): weighted updates."""
        return self.kind in ("train", "split")


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    tls: TlsConfig
    roster_path: Path
    roster: Roster
    names: dict[int, str]
    state_dir: Path
    rounds: RoundsTable
    task: TaskConfig
    ckks: CkksConfig | None = None
    #: Checkpoints (and their PEFT adapters) kept after each round, newest first; 0 keeps all.
    keep_checkpoints: int = 0
    #: Processes for the O(d) work of a masking round (1: the server process itself).
    workers: int = 1
    #: ``[dp]``: client-level distributed DP (masking only); None: off.
    dp: DpSettings | None = None


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load_dp(path: Path, table: Table, masking: bool, ring_bits: int) -> DpSettings | None:
    """``[dp]``: client-level distributed DP over the whole run (masking only)."""
    if not table.keys():
        table.done()
        return None
    if not masking:
        raise ConfigError(
            f'{path}: [dp] needs backend = "masking": the integer DP noise must be summed exactly '
            "in the ring, which CKKS's approximate arithmetic does not do"
        )
    try:
        settings = DpSettings(
            epsilon=table.number("epsilon", positive=True),
            delta=table.number("delta", default=1e-5, positive=True, maximum=0.5),
            clip=table.number("clip", default=1.0, positive=True),
            mechanism=cast(
                Mechanism,
                table.string("mechanism", default="skellam", choices=MECHANISMS),
            ),
            ring_bits=ring_bits,
        )
    except FLError as exc:
        raise ConfigError(f"{path}: [dp] {exc}") from None
    table.done()
    return settings


def _load_ckks(
    path: Path, table: Table, rounds: RoundsTable, task: TaskConfig, roster: Roster
) -> CkksConfig:
    # Imported here: tenseal loads only on a server configured for ckks.
    from secagg.he import CKKSParams
    from wire.he_files import load_public_context

    public_path = table.path("public_context")
    min_contributors = table.integer("min_contributors", default=2, minimum=2)
    try:
        params = CKKSParams(
            clip=task.clip,
            max_clients=rounds.cohort_size,
            max_weight=task.max_weight if task.trains else 1,
            weighted=task.trains,
            min_contributors=min_contributors,
            poly_modulus_degree=table.integer("poly_modulus_degree", default=8192, minimum=1),
            coeff_mod_bit_sizes=table.integers(
                "coeff_mod_bit_sizes", default=[60, 60], minimum=1, maximum=60
            ),
            scale_bits=table.integer("scale_bits", default=40, minimum=1),
        )
    except ConfigurationError as exc:
        raise ConfigError(f"{path}: [ckks]: {exc}") from None
    table.done()
    if min_contributors > rounds.min_clients:
        raise ConfigError(
            f"{path}: ckks.min_contributors ({min_contributors}) must be <= rounds.min_clients "
            f"({rounds.min_clients}): a round may start with only min_clients clients"
        )
    return CkksConfig(
        public_path, load_public_context(public_path, params, roster), min_contributors
    )


def _load_split(path: Path, table: Table, adapter_base: str | None) -> SplitServerConfig:
    d = SplitServerConfig()
    server_lr = table.number("server_lr", positive=True) if table.has("server_lr") else None
    threads = table.integer("threads", minimum=1) if table.has("threads") else None
    out = SplitServerConfig(
        client_bottom=table.integer("client_bottom", default=d.client_bottom, minimum=0),
        client_top=table.integer("client_top", default=d.client_top, minimum=0),
        base=table.string("base", default=adapter_base or d.base),
        institutions=table.integer("institutions", default=d.institutions, minimum=1),
        records=table.integer("records", default=d.records, minimum=1),
        federation_seed=table.integer("federation_seed", default=d.federation_seed, minimum=0),
        max_length=table.integer("max_length", default=d.max_length, minimum=2, maximum=1 << 20),
        step_timeout_s=table.number(
            "step_timeout_s", default=d.step_timeout_s, positive=True, maximum=MAX_TIMEOUT_S
        ),
        server_lr=server_lr,
        threads=threads,
        device=table.string("device", default=d.device, choices=("auto", "cpu", "cuda", "mps")),
    )
    table.done()
    return out


def load_server_config(path: Path) -> ServerConfig:
    top = load_toml(path)
    server = top.table("server")
    listen = server.address("listen", default="127.0.0.1:50051", allow_port_zero=True)
    tls = TlsConfig(
        cert=server.path("tls_cert"),
        key=server.path("tls_key"),
        client_ca=server.path("client_ca") if server.has("client_ca") else None,
    )
    check_key_pair(tls.cert, tls.key)
    if tls.client_ca is not None:
        load_certificates(tls.client_ca, "client CA")
    roster_path = server.path("roster")
    state_dir = server.path("state_dir", default="state", must_exist=False)
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"{path}: server.state_dir: {state_dir} exists and is not a directory")
    keep_checkpoints = server.integer("keep_checkpoints", default=0, minimum=0)
    workers = server.integer("workers", default=default_workers(), minimum=1, maximum=1024)
    server.done()

    rounds_table = top.table("rounds")
    backend = rounds_table.string("backend", default="masking", choices=BACKENDS)
    masking = backend == "masking"
    rounds = RoundsTable(
        rounds=rounds_table.integer("count", minimum=1),
        cohort_size=rounds_table.integer("cohort_size", minimum=2),
        min_clients=rounds_table.integer("min_clients", minimum=2),
        threshold=rounds_table.integer("threshold", default=0, minimum=0) if masking else 0,
        ring_bits=(
            rounds_table.integer("ring_bits", default=32, minimum=8, maximum=64) if masking else 0
        ),
        neighbours=rounds_table.integer("neighbours", default=0, minimum=0) if masking else 0,
        stage_timeout_s=rounds_table.number(
            "stage_timeout_s", default=30.0, positive=True, maximum=MAX_TIMEOUT_S
        ),
        join_timeout_s=rounds_table.number(
            "join_timeout_s", default=60.0, positive=True, maximum=MAX_TIMEOUT_S
        ),
        seed=rounds_table.integer("seed", default=0, minimum=0, maximum=2**63 - 1),
        backend=backend,
        max_attempts=rounds_table.integer("max_attempts", default=5, minimum=1, maximum=1000),
        corrupt_fraction=(
            rounds_table.fraction("corrupt_fraction", default=0.05) if masking else 0.05
        ),
        dropout_fraction=(
            rounds_table.fraction("dropout_fraction", default=0.05) if masking else 0.05
        ),
    )
    rounds_table.done()

    task_table = top.table("task")
    kind = task_table.string("kind", choices=("random", "train", "split"))
    clip = task_table.number("clip", default=1.0, positive=True)
    if kind == "random":
        task = TaskConfig(kind, task_table.integer("dim", minimum=1, maximum=1 << 28), clip)
    else:
        initial_adapter = task_table.path("initial_adapter")
        try:
            _, adapter = load_adapter(initial_adapter)
        except AdapterFormatError as exc:
            raise ConfigError(f"{path}: task.initial_adapter: {exc}") from None
        base: BaseKind = "embedded" if adapter.base_model_name_or_path is None else "pretrained"
        recipe = resolve_table(task_table, "round", base).recipe
        try:
            recipe.stage_rounds(rounds.rounds)
        except RecipeError as exc:
            raise ConfigError(f"{path}: task.stage: {exc}") from None
        split = None
        if kind == "split":
            if recipe.strategy == "scaffold":
                raise ConfigError(
                    f'{path}: task.strategy scaffold is not offered with kind = "split": its '
                    "control variates would cover the institutions' part only; choose another"
                )
            if recipe.local_steps is None:
                raise ConfigError(
                    f"{path}: task.local_epochs: split training counts local_steps (the "
                    "server's schedule of steps); set task.local_steps instead"
                )
            if not top.has("split"):
                raise ConfigError(
                    f'{path}: kind = "split" needs a [split] table (the cut: client_bottom, '
                    "client_top; an empty table takes the defaults)"
                )
            split = _load_split(path, top.table("split"), adapter.base_model_name_or_path)
        task = TaskConfig(
            kind,
            0,  # from the adapter's layout
            clip,
            initial_adapter=initial_adapter,
            recipe=recipe,
            max_weight=task_table.integer("max_weight", default=1000, minimum=1),
            split=split,
        )
    task_table.done()
    ckks_table = None if masking else top.table("ckks")
    dp = _load_dp(path, top.table("dp", required=False), masking, rounds.ring_bits)
    top.done()

    roster, names = load_roster(roster_path)
    if rounds.min_clients > rounds.cohort_size:
        raise ConfigError(f"{path}: rounds.min_clients must be <= rounds.cohort_size")
    if rounds.cohort_size > len(roster):
        raise ConfigError(
            f"{path}: rounds.cohort_size ({rounds.cohort_size}) exceeds the {len(roster)} "
            f"institutions in {roster_path}"
        )
    if ckks_table is not None:
        ckks = _load_ckks(path, ckks_table, rounds, task, roster)
        return ServerConfig(
            listen,
            tls,
            roster_path,
            roster,
            names,
            state_dir,
            rounds,
            task,
            ckks,
            keep_checkpoints=keep_checkpoints,
            workers=workers,
        )
    if dp is not None:
        floor = rounds.dp_floor(rounds.cohort_size)
        if rounds.min_clients < floor:
            raise ConfigError(
                f"{path}: with [dp] a round must release at least {floor} contributors (the noise "
                f"is sized for them): raise rounds.min_clients from {rounds.min_clients} to {floor}"
            )
    for size in (rounds.min_clients, rounds.cohort_size):
        try:
            shape = rounds.session_shape(size)
        except ConfigurationError as exc:
            raise ConfigError(f"{path}: [rounds] for a cohort of {size}: {exc}") from None
        if shape.min_release > size:
            raise ConfigError(
                f"{path}: [rounds] a cohort of {size} cannot release a sum: it needs "
                f"{shape.min_release} contributors (threshold {shape.threshold}, quorum "
                f"{shape.quorum}); lower rounds.threshold or raise rounds.min_clients"
            )
    try:
        QuantizationParams.fit(
            rounds.ring_bits,
            task.clip,
            rounds.cohort_size,
            task.max_weight if task.trains else 1,
            weighted=task.trains,
        )
    except ConfigurationError as exc:
        raise ConfigError(f"{path}: rounds.ring_bits: {exc}") from None
    return ServerConfig(
        listen,
        tls,
        roster_path,
        roster,
        names,
        state_dir,
        rounds,
        task,
        keep_checkpoints=keep_checkpoints,
        workers=workers,
        dp=dp,
    )

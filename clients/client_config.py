"""``fedsec client --config client.toml``: an institution's settings, validated on load.

The policy table is the institution's own floor under what a coordinator may ask of it
(:class:`secagg.protocol.ClientPolicy`): a round below ``min_threshold``, ``min_cohort`` or
``min_ring_bits``, or below the threshold, neighbourhood degree and survivor-set quorum the
client derives itself from the cohort size and its own ``corrupt_fraction`` (how many of the
cohort it assumes may collude with the coordinator; default 0.05) and ``dropout_fraction``, is
refused by the client's protocol session before it trains, whatever the server says.

``[data]`` holds the institution's training data: ``synthetic`` (an embedded institution, with
its SFT records and its preference pairs) or ``jsonl`` (SFT records), and ``preference`` (its
preference pairs, for the DPO rounds of a coordinator whose ``[task] stage`` has them).

``[client] backend`` (``"masking"`` by default, or ``"ckks"``) is the one aggregation backend
this institution takes part in; a round of the other backend is refused before anything is
computed or uploaded. Under ckks, ``[ckks] secret_context`` is the federation's secret context
this institution opened (``fedsec he-keys open``), kept in its own directory with mode 0600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fl_core.recipe import BaseKind, Recipe, resolve_table
from fl_core.toml_config import ConfigError, load_toml
from secagg.errors import ConfigurationError
from secagg.keys import Identity, Roster
from secagg.protocol import ClientPolicy
from wire.credentials import check_key_pair, load_certificates, load_identity, load_roster

if TYPE_CHECKING:
    from wire.he_files import HeldSecret

#: Messages a client can be told to withhold (``[testing] stall_before``).
STALLABLE_STAGES = (
    "seed_commit",
    "advertise_keys",
    "share_keys",
    "masked_input",
    "consistency_check",
    "unmask",
    "he_upload",
    "he_decrypt",
    # Split training: the gradient at the top cut of the first step (a client lost mid-step).
    "split_gradient",
)
BACKENDS = ("masking", "ckks")


@dataclass(frozen=True)
class TrainOptions:
    """How this institution builds its model for ``train`` rounds (``[train]``).

    ``base = "embedded"`` builds the seeded tiny Llama of :mod:`clients.model_factory` with a
    tokenizer trained on the embedded synthetic federation (``institutions``, ``records``,
    ``federation_seed``), so every party builds the same base; otherwise ``base`` is a named
    model (``smollm2-135m``) or a local transformers model directory. ``recipe`` holds the
    institution's own recipe settings (:mod:`fl_core.recipe`'s ``local`` and ``shared`` fields:
    LoRA shape, max length, grad accumulation, device, precision, quantization, threads),
    with the base's defaults; the coordinator's (lr, steps, batch, strategy) arrive with each
    round. The LoRA shape must match the coordinator's adapter (the layout fingerprint in every
    round config is checked).
    """

    base: str
    institutions: int
    records: int
    federation_seed: int
    recipe: Recipe


@dataclass(frozen=True)
class PrivacyPolicy:
    """``[policy]`` DP keys: refuse a round that would take the epsilon this institution has
    spent against the server (at ``delta``) above ``max_epsilon`` (None: no budget), or that has
    no DP noise when ``require_dp``; ``ledger`` records every release charged."""

    max_epsilon: float | None = None
    require_dp: bool = False
    delta: float = 1e-5
    ledger: Path | None = None


@dataclass(frozen=True)
class ClientConfig:
    client_id: int
    server: str
    #: Name the server certificate must carry, when ``server`` is an address it does not list.
    server_name: str | None
    ca_cert: Path
    identity: Identity
    #: Optional client certificate and key for servers that require mutual TLS.
    tls_cert: Path | None
    tls_key: Path | None
    reconnect_max_s: float
    give_up_after_s: float
    policy: ClientPolicy
    #: The DP side of the institution's policy and where its privacy ledger is kept.
    privacy: PrivacyPolicy
    #: Name of an embedded synthetic institution (``clients.synthetic``), or None.
    synthetic: str | None
    #: Local JSONL training data, or None.
    jsonl: Path | None
    #: The federation's roster, received out of band: peers' advertised keys are verified
    #: against it, never against anything the server sends.
    roster: Roster
    #: Fault injection for tests and drills: stop (and wait to be killed) instead of sending
    #: the message of this stage; None in normal operation.
    stall_before: str | None
    #: Stall only in this round (None: in every round).
    stall_round: int | None
    #: Model settings for ``train`` rounds; None: this client only takes ``random`` rounds.
    train: TrainOptions | None
    #: The aggregation backend this institution takes part in.
    backend: str = "masking"
    #: Under ckks: where the secret context is (or, before ``he-keys open``, will be) stored.
    ckks_secret_path: Path | None = None
    #: Under ckks: the loaded secret context (None when loaded with ``load_secret=False``).
    ckks_secret: HeldSecret | None = None
    #: Local preference pairs for DPO rounds (any file type of :mod:`clients.preference_data`),
    #: or None (an embedded ``synthetic`` institution has its own pairs).
    preference: Path | None = None
    #: Split rounds (``[split] activation_noise``): Gaussian noise added to every activation
    #: this institution sends, its standard deviation this multiple of each position's RMS.
    activation_noise: float = 0.0


def load_client_config(path: Path, load_secret: bool = True) -> ClientConfig:
    """Read and check ``path``. ``load_secret=False`` is for ``fedsec he-keys``, which runs
    before the secret context exists (it writes it)."""
    top = load_toml(path)
    client = top.table("client")
    client_id = client.integer("id", minimum=1, maximum=2**32 - 1)
    server = client.address("server")
    server_name = client.string("server_name") if client.has("server_name") else None
    ca_cert = client.path("ca_cert")
    load_certificates(ca_cert, "CA certificate")
    identity = load_identity(client.path("identity"))
    tls_cert = client.path("tls_cert") if client.has("tls_cert") else None
    tls_key = client.path("tls_key") if client.has("tls_key") else None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError(f"{path}: client.tls_cert and client.tls_key go together")
    if tls_cert is not None and tls_key is not None:
        check_key_pair(tls_cert, tls_key)
    roster, _ = load_roster(client.path("roster"))
    reconnect_max_s = client.number("reconnect_max_s", default=10.0, positive=True, maximum=3600)
    give_up_after_s = client.number(
        "give_up_after_s", default=600.0, positive=True, maximum=30 * 86_400
    )
    backend = client.string("backend", default="masking", choices=BACKENDS)
    client.done()

    policy_table = top.table("policy", required=False)
    try:
        policy = ClientPolicy(
            min_threshold=policy_table.integer("min_threshold", default=2, minimum=1),
            min_cohort=policy_table.integer("min_cohort", default=2, minimum=1),
            min_ring_bits=policy_table.integer("min_ring_bits", default=16, minimum=1, maximum=64),
            corrupt_fraction=policy_table.fraction("corrupt_fraction", default=0.05),
            dropout_fraction=policy_table.fraction("dropout_fraction", default=0.05),
            security_bits=policy_table.integer("security_bits", default=40, minimum=1, maximum=256),
        )
    except ConfigurationError as exc:
        raise ConfigError(f"{path}: [policy] {exc}") from None
    privacy = PrivacyPolicy(
        max_epsilon=(
            policy_table.number("max_epsilon", positive=True)
            if policy_table.has("max_epsilon")
            else None
        ),
        require_dp=policy_table.boolean("require_dp", default=False),
        delta=policy_table.number("dp_delta", default=1e-5, positive=True, maximum=0.5),
        ledger=policy_table.path("privacy_ledger", default="privacy-ledger.json", must_exist=False),
    )
    policy_table.done()

    data = top.table("data", required=False)
    synthetic = data.string("synthetic") if data.has("synthetic") else None
    jsonl = data.path("jsonl") if data.has("jsonl") else None
    preference = data.path("preference") if data.has("preference") else None
    data.done()
    if synthetic is not None and jsonl is not None:
        raise ConfigError(f"{path}: data.synthetic and data.jsonl are alternatives; set one")
    train: TrainOptions | None = None
    if top.has("train"):
        t = top.table("train")
        base = _resolve_base(path, t.string("base", default="embedded"))
        kind: BaseKind = "embedded" if base == "embedded" else "pretrained"
        train = TrainOptions(
            base=base,
            institutions=t.integer("institutions", default=4, minimum=1),
            records=t.integer("records", default=160, minimum=1),
            federation_seed=t.integer("federation_seed", default=0, minimum=0),
            recipe=resolve_table(t, "local", kind).recipe,
        )
        t.done()
        if synthetic is None and jsonl is None:
            raise ConfigError(f"{path}: [train] needs data.synthetic or data.jsonl")
    split = top.table("split", required=False)
    activation_noise = split.number("activation_noise", default=0.0, maximum=1e6)
    if activation_noise < 0:
        raise ConfigError(f"{path}: split.activation_noise must be >= 0, got {activation_noise}")
    split.done()
    testing = top.table("testing", required=False)
    stall_before = (
        testing.string("stall_before", choices=STALLABLE_STAGES)
        if testing.has("stall_before")
        else None
    )
    stall_round = testing.integer("stall_round", minimum=0) if testing.has("stall_round") else None
    testing.done()
    secret_path: Path | None = None
    secret: HeldSecret | None = None
    if backend == "ckks":
        ckks = top.table("ckks")
        secret_path = ckks.path("secret_context", must_exist=load_secret)
        ckks.done()
        if load_secret:
            # Imported here: tenseal loads only on an institution configured for ckks.
            from wire.he_files import load_secret_context

            secret = load_secret_context(secret_path)
    top.done()
    return ClientConfig(
        client_id,
        server,
        server_name,
        ca_cert,
        identity,
        tls_cert,
        tls_key,
        reconnect_max_s,
        give_up_after_s,
        policy,
        privacy,
        synthetic,
        jsonl,
        roster,
        stall_before,
        stall_round,
        train,
        backend,
        secret_path,
        secret,
        preference,
        activation_noise,
    )


def _resolve_base(path: Path, base: str) -> str:
    """``[train] base``: ``embedded``, a named model, or a model directory, which like every
    other path in the file is relative to the file, and must exist (a client that cannot load
    its base must not start)."""
    # Imported here: the model catalogue loads torch, which only training clients need.
    from clients.model_factory import NAMED_MODELS

    if base == "embedded" or base in NAMED_MODELS:
        return base
    directory = (path.parent / Path(base).expanduser()).resolve()
    if not directory.is_dir():
        raise ConfigError(
            f"{path}: train.base: {directory} is not a model directory (relative paths are "
            f"relative to this file); use a directory, embedded, or one of "
            f"{', '.join(NAMED_MODELS)}"
        )
    return str(directory)

"""``fedsec keygen``: institution identities, a roster and development TLS certificates.

Two uses:

- ``fedsec keygen --out DIR --clients N`` writes a complete development deployment: a dev CA
  with a server certificate (and per-client certificates for mutual TLS) under ``DIR/pki``,
  ``N`` identities ``DIR/client-<id>/identity.key``, the roster ``DIR/roster.toml`` listing
  them, and ready-to-run configs ``DIR/server.toml`` and ``DIR/client-<id>/client.toml``. By
  default (``--task train``) the federation fine-tunes the embedded model with LoRA, each
  institution on one of the embedded synthetic institutions' data: keygen also writes the
  starting adapter ``DIR/initial-adapter`` (what institution 1 would write with ``fedsec client
  --init-adapter``) and the embedded base model with its tokenizer, ``DIR/base-model``, so the
  global adapters the server checkpoints load in plain PEFT from the deployment directory alone.
  ``--task random`` makes a protocol drill that sums random vectors instead.
- ``fedsec keygen --out DIR --clients N --backend ckks`` also makes the federation's CKKS keys
  the way institutions make them (:mod:`clients.he_keys_cli`: announce, deal, open), all in one
  process for a local development federation: client 1 acts as the key dealer, the public
  context goes to ``DIR/he/public-context.bin`` where ``server.toml`` points, and each
  institution's opened secret context (secret key and tag key) to
  ``DIR/client-<id>/he-secret.ctx`` only. In production
  the dealer is one of the institutions, never the coordinator nor the CA, and each step runs on
  its own institution's machine.
- ``fedsec keygen --identity FILE --id ID`` writes one institution's identity key (what an
  institution does on its own machine) and prints the ``[[institution]]`` entry to send to the
  coordinator, who appends it to the roster. The private key never leaves the institution.

Existing files are never overwritten: regenerating a key by accident would lock an institution
out (or, for the CA, every institution).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fl_core.cli import UsageError
from fl_core.toml_config import check_host
from secagg.keys import Identity, Roster
from secagg.params import session_shape
from wire.credentials import RosterEntry, make_dev_pki, save_identity, write_roster

#: Where a training deployment keeps its starting adapter and the embedded base model.
INITIAL_ADAPTER = "initial-adapter"
BASE_MODEL = "base-model"
#: Synthetic institutions of the embedded federation the development clients train on (client
#: ids beyond it reuse them in turn: the base model does not depend on the cohort size).
EMBEDDED_INSTITUTIONS = 4

#: Where a ckks development deployment keeps the coordinator's public context and each
#: institution's secret context (relative to the deployment and to the client's directory).
PUBLIC_CONTEXT = "he/public-context.bin"
SECRET_CONTEXT = "he-secret.ctx"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="directory for a development deployment")
    parser.add_argument("--clients", type=int, default=5, help="number of institutions (ids 1..N)")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name or IP the server certificate covers (repeatable; default localhost, "
        "127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=50051, help="port in the generated configs")
    parser.add_argument(
        "--backend",
        choices=("masking", "ckks"),
        default="masking",
        help="aggregation backend of the generated configs; ckks also makes the CKKS keys",
    )
    parser.add_argument(
        "--task",
        choices=("train", "random"),
        default="train",
        help="what the generated federation does: fine-tune the embedded model with LoRA "
        "(train, the default; also writes DIR/initial-adapter and DIR/base-model) or sum random "
        "vectors (random: a protocol drill, no torch on the clients)",
    )
    parser.add_argument("--identity", type=Path, help="write one identity key to this file")
    parser.add_argument("--id", type=int, help="client id of the --identity key")
    parser.add_argument("--name", default=None, help="display name for the roster entry")


def _roster_entry_text(entry: RosterEntry) -> str:
    return (
        f"[[institution]]\nid = {entry.client_id}\nname = {json.dumps(entry.name)}\n"
        f'public_key = "{entry.public_key.hex()}"\n'
    )


def _one_identity(args: argparse.Namespace) -> int:
    if args.id is None or not 1 <= args.id <= 2**32 - 1:
        raise UsageError("--identity needs --id in [1, 2^32 - 1]")
    path: Path = args.identity
    if path.exists():
        raise UsageError(f"{path} exists; refusing to overwrite an identity key")
    identity = Identity.generate()
    save_identity(identity, path)
    name = args.name or f"client-{args.id}"
    print(f"# wrote {path}; add this to the coordinator's roster:")
    print(_roster_entry_text(RosterEntry(args.id, name, identity.public_bytes)), end="")
    return 0


def _task_toml(task: str) -> str:
    if task == "random":
        return """[task]
# A protocol drill: every institution sends a random vector; the server checks the exact sum.
kind = "random"
dim = 1000
"""
    return f"""[task]
# Fine-tune with LoRA from this adapter (written by keygen as institution 1 would with
# `fedsec client --config client-1/client.toml --init-adapter DIR`). Each round's global adapter
# goes to state/checkpoints/adapter-<round>; the run record to state/run.
kind = "train"
initial_adapter = "{INITIAL_ADAPTER}"
strategy = "fedavg"
"""


def _train_toml(client_id: int, names: list[str]) -> str:
    name = names[(client_id - 1) % len(names)]
    return f"""
[train]
# The embedded tiny Llama, which every institution builds identically from the embedded corpus.
# For a real model: base = "a/local/model/directory" (relative to this file) or "smollm2-135m".
base = "embedded"
institutions = {len(names)}

[data]
# One of the embedded synthetic institutions; for your own data: jsonl = "path/to/train.jsonl".
synthetic = "{name}"
"""


def _server_toml(port: int, clients: int, backend: str, task: str) -> str:
    # The smallest sum a full cohort may release against an active server, and a round may
    # lose one client and still finish.
    threshold = session_shape(clients).min_release
    min_clients = min(clients, threshold + 1)
    if backend == "ckks":
        # The same floor as masking's threshold: no sum of fewer institutions is released.
        rounds = f"""backend = "ckks"
cohort_size = {clients}
min_clients = {min_clients}"""
        ckks = f'''
[ckks]
public_context = "{PUBLIC_CONTEXT}"
min_contributors = {threshold}
'''
    else:
        rounds = f"""cohort_size = {clients}
min_clients = {min_clients}
ring_bits = 32
# Each round's threshold, graph and survivor-set quorum hold against an active server that
# colludes with up to this fraction of the cohort (clients check with their own fraction).
corrupt_fraction = 0.05"""
        ckks = ""
    return f"""# fedsec server config (development; generated by fedsec keygen)
[server]
listen = "127.0.0.1:{port}"
tls_cert = "pki/server.pem"
tls_key = "pki/server.key"
roster = "roster.toml"
state_dir = "state"
# Processes for unmasking and unpacking (default: every CPU the server may use).
# workers = 4

[rounds]
count = {3 if task == "train" else 2}
{rounds}
stage_timeout_s = 30.0
# Also the deadline of a round's first message, which clients send after training.
join_timeout_s = {600.0 if task == "train" else 60.0}

{_task_toml(task)}{ckks}"""


def _client_toml(client_id: int, host: str, port: int, backend: str, train: str) -> str:
    ckks = (
        f'''
[ckks]
secret_context = "{SECRET_CONTEXT}"
'''
        if backend == "ckks"
        else ""
    )
    return f"""# fedsec client config (development; generated by fedsec keygen)
[client]
id = {client_id}
server = "{host}:{port}"
ca_cert = "../pki/ca.pem"
identity = "identity.key"
roster = "../roster.toml"
backend = "{backend}"

[policy]
min_threshold = 2
min_cohort = 2
min_ring_bits = 16
# How many of a cohort this institution assumes may collude with the coordinator: it refuses
# any round whose threshold, neighbourhood degree or survivor-set quorum is unsafe for that.
corrupt_fraction = 0.05
{train}{ckks}"""


def _write_training_start(out: Path) -> None:
    """The starting adapter and the embedded base with its tokenizer, built as the clients
    build them (imported here: torch loads only when a training deployment is made)."""
    from clients.client_config import load_client_config
    from clients.model_factory import build_default_base, save_base
    from clients.synthetic import make_federation
    from clients.train_task import LocalTrainer

    config = load_client_config(out / "client-1" / "client.toml")
    LocalTrainer(config).write_initial_adapter(out / INITIAL_ADAPTER)
    options = config.train
    if options is None:  # _train_toml wrote a [train] table; narrows the type for mypy
        raise UsageError("internal: client-1 was written without [train]")
    federation = make_federation(
        options.institutions, options.records, seed=options.federation_seed
    )
    save_base(*build_default_base(federation.corpus()), out / BASE_MODEL)


def _embedded_names() -> list[str]:
    from clients.synthetic import make_federation

    return [i.name for i in make_federation(EMBEDDED_INSTITUTIONS, 1).institutions]


def _dev_ckks_keys(out: Path, identities: dict[int, Identity]) -> None:
    """The institutions' key distribution, run in one process for a development federation."""
    # Imported here: tenseal loads only when CKKS keys are made.
    from wire.he_files import (
        CkksShape,
        announce,
        deal,
        new_session_id,
        open_sealed,
        save_secret_context,
        write_public_context,
    )

    roster = Roster({client_id: i.public_bytes for client_id, i in identities.items()})
    dealer, *others = sorted(identities)
    session = new_session_id()
    agreements = {c: announce(identities[c], c, session) for c in others}
    dealt = deal(
        identities[dealer],
        dealer,
        session,
        CkksShape(),
        [announcement for _, announcement in agreements.values()],
        roster,
    )
    save_secret_context(dealt.secret, out / f"client-{dealer}" / SECRET_CONTEXT)
    for client_id, (agreement, _) in agreements.items():
        secret = open_sealed(
            dealt.sealed_files[client_id],
            agreement,
            session,
            client_id,
            roster,
            out / f"client-{client_id}",
        )
        save_secret_context(secret, out / f"client-{client_id}" / SECRET_CONTEXT)
    write_public_context(dealt.public_file, out / PUBLIC_CONTEXT)


def _dev_bundle(args: argparse.Namespace) -> int:
    out: Path = args.out
    if not 3 <= args.clients <= 10_000:
        raise UsageError(f"--clients must be in [3, 10000], got {args.clients}")
    if not 1 <= args.port <= 65535:
        raise UsageError(
            f"--port must be in [1, 65535] (the port clients connect to), got {args.port}"
        )
    for host in args.host or ():
        problem = check_host(host)
        if problem is not None:
            raise UsageError(f"--host: {problem}")
    if (out / "roster.toml").exists() or (out / "pki").exists():
        raise UsageError(f"{out} already holds a deployment; refusing to overwrite its keys")
    hosts = args.host or ["localhost", "127.0.0.1"]
    ids = list(range(1, args.clients + 1))
    names = _embedded_names() if args.task == "train" else []
    make_dev_pki(out / "pki", hosts, ids)
    entries = []
    identities = {}
    for client_id in ids:
        identity = Identity.generate()
        identities[client_id] = identity
        save_identity(identity, out / f"client-{client_id}" / "identity.key")
        entries.append(RosterEntry(client_id, f"client-{client_id}", identity.public_bytes))
        (out / f"client-{client_id}" / "client.toml").write_text(
            _client_toml(
                client_id,
                hosts[0],
                args.port,
                args.backend,
                _train_toml(client_id, names) if names else "",
            )
        )
    write_roster(entries, out / "roster.toml")
    if args.backend == "ckks":
        _dev_ckks_keys(out, identities)
    if names:
        print("building the embedded model's starting adapter and base...", flush=True)
        _write_training_start(out)
    (out / "server.toml").write_text(_server_toml(args.port, args.clients, args.backend, args.task))
    print(
        f"wrote a development deployment for {args.clients} institutions ({args.backend}, "
        f"{args.task}) to {out}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.identity is not None:
        if args.out is not None:
            raise UsageError("use either --out (a whole deployment) or --identity (one key)")
        return _one_identity(args)
    if args.out is None:
        raise UsageError("give --out DIR (a development deployment) or --identity FILE --id N")
    return _dev_bundle(args)

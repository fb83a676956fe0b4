"""``docs/configuration.md``, generated from the config loaders themselves.

The loaders (:func:`server.config.load_server_config`, :func:`clients.client_config.
load_client_config`) read every key through :class:`fl_core.toml_config.Table`, which
declares its type, default and range where it is read; :func:`fl_core.toml_config.
trace_keys` records those reads. This module loads a set of sample deployments made by
``fedsec keygen`` (masking and ckks, with the optional tables filled in) under that trace and
renders one table per config table, with the descriptions of :data:`DESCRIPTIONS` and the
training recipe's own field table (:data:`fl_core.recipe.FIELDS`). A test regenerates the file
and compares, so the reference cannot fall behind the code:

    python -m server.config_reference > docs/configuration.md
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fl_core.cli import main as fedsec
from fl_core.recipe import EMBEDDED, FIELDS, PRETRAINED, FieldSpec
from fl_core.toml_config import KeySpec, trace_keys
from server.config import load_server_config

#: What each key is for, by ``file:table.key`` (recipe keys are described in FIELDS). The test
#: of the generated file requires one for every key the loaders read.
DESCRIPTIONS: dict[str, str] = {
    "server.toml:server.listen": "address the gRPC server binds (port 0: any free port)",
    "server.toml:server.tls_cert": "the server's TLS certificate chain (PEM)",
    "server.toml:server.tls_key": "the key of `tls_cert` (checked to match it at start)",
    "server.toml:server.client_ca": "CA of client certificates: set it to require mutual TLS",
    "server.toml:server.roster": "the institutions' roster (ids, names, Ed25519 keys)",
    "server.toml:server.state_dir": "SQLite state, checkpoints, adapters and the run record",
    "server.toml:server.keep_checkpoints": "checkpoints kept (oldest pruned); 0 keeps all",
    "server.toml:server.workers": "processes that unmask and unpack; 1 keeps it in the server",
    "server.toml:rounds.backend": "how the sum is computed: pairwise masks or CKKS",
    "server.toml:rounds.count": "rounds the federation runs",
    "server.toml:rounds.cohort_size": "institutions invited to each round",
    "server.toml:rounds.min_clients": "fewest online institutions a round starts with",
    "server.toml:rounds.threshold": "a floor on the Shamir threshold (raises the derived one)",
    "server.toml:rounds.ring_bits": "bits of the ring Z_2^b the masked sum lives in",
    "server.toml:rounds.neighbours": "0: complete graph; k: SecAgg+ neighbourhoods of >= k",
    "server.toml:rounds.stage_timeout_s": "deadline of each protocol stage",
    "server.toml:rounds.join_timeout_s": "wait for the cohort to come online (ckks: uploads)",
    "server.toml:rounds.seed": "public seed of the random task and training data order",
    "server.toml:rounds.max_attempts": "aborted attempts of one round before the server stops",
    "server.toml:rounds.corrupt_fraction": "share of a cohort assumed to collude with the server",
    "server.toml:rounds.dropout_fraction": "share of a cohort a round is sized to lose",
    "server.toml:task.kind": "train: LoRA fine-tuning; random: a protocol drill",
    "server.toml:task.clip": "per-coordinate bound of a contribution (quantisation range)",
    "server.toml:task.initial_adapter": "kind = train: the PEFT adapter the run starts from",
    "server.toml:task.max_weight": "largest sample-count weight a client may claim",
    "server.toml:task.dim": "kind = random: length of the vectors",
    "server.toml:dp.epsilon": "client-level epsilon against the server over the whole run",
    "server.toml:dp.delta": "the delta of that guarantee",
    "server.toml:dp.clip": "L2 norm each contribution is clipped to",
    "server.toml:dp.mechanism": "integer noise: Skellam or distributed discrete Gaussian",
    "server.toml:ckks.public_context": "the federation's public CKKS context (from the dealer)",
    "server.toml:ckks.min_contributors": "fewest uploads a ckks sum may hold",
    "server.toml:ckks.poly_modulus_degree": "CKKS ring degree the context must have",
    "server.toml:ckks.coeff_mod_bit_sizes": "CKKS modulus chain the context must have",
    "server.toml:ckks.scale_bits": "CKKS scale (bits) the context must have",
    "server.toml:split.base": "kind = split: the base model the server cuts (as [train] base)",
    "server.toml:split.client_bottom": "blocks the institutions keep at the bottom",
    "server.toml:split.client_top": "blocks the institutions keep at the top (with the head)",
    "server.toml:split.device": "where the server runs its blocks",
    "server.toml:split.federation_seed": "embedded base: the federation's seed (as the clients')",
    "server.toml:split.institutions": "embedded base: the federation's size (as the clients')",
    "server.toml:split.max_length": "tokens per example: bounds every step tensor",
    "server.toml:split.records": "embedded base: records per institution (as the clients')",
    "server.toml:split.step_timeout_s": "deadline of each message of a split step",
    "roster.toml:institution.id": "the institution's client id",
    "roster.toml:institution.name": "display name, in logs and the run record",
    "roster.toml:institution.public_key": "its Ed25519 identity key, hex",
    "client.toml:client.id": "this institution's id in the roster",
    "client.toml:client.server": "the coordinator's host:port",
    "client.toml:client.server_name": "name the server certificate must carry, if not the host",
    "client.toml:client.ca_cert": "CA that issued the server certificate",
    "client.toml:client.identity": "this institution's Ed25519 identity key (mode 0600)",
    "client.toml:client.tls_cert": "client certificate, for servers that require mutual TLS",
    "client.toml:client.tls_key": "the key of `tls_cert`",
    "client.toml:client.roster": "the roster, as distributed out of band",
    "client.toml:client.reconnect_max_s": "longest backoff between reconnection attempts",
    "client.toml:client.give_up_after_s": "exit after the server is unreachable this long",
    "client.toml:client.backend": "the backend this institution takes part in",
    "client.toml:policy.min_threshold": "refuse rounds whose release floor is below this",
    "client.toml:policy.min_cohort": "refuse rounds with fewer institutions",
    "client.toml:policy.min_ring_bits": "refuse rounds over a smaller ring",
    "client.toml:policy.corrupt_fraction": "this institution's own collusion assumption",
    "client.toml:policy.dropout_fraction": "dropouts it sizes SecAgg+ degrees for",
    "client.toml:policy.security_bits": "SecAgg+ graph failure probability 2^-bits it demands",
    "client.toml:policy.max_epsilon": "refuse rounds that would spend more epsilon (unset: none)",
    "client.toml:policy.require_dp": "refuse rounds without DP noise",
    "client.toml:policy.dp_delta": "the delta its epsilon budget is counted at",
    "client.toml:policy.privacy_ledger": "where every release it joined is recorded",
    "client.toml:data.synthetic": "train on this embedded synthetic institution's data",
    "client.toml:data.jsonl": "train on these local records (one JSON object per line)",
    "client.toml:data.preference": "DPO pairs ({prompt, chosen, rejected} or chat form)",
    "client.toml:split.activation_noise": "split rounds: noise on sent activations, x their RMS",
    "client.toml:train.base": "embedded, a named model, or a model directory",
    "client.toml:train.institutions": "embedded federation's size (its tokenizer depends on it)",
    "client.toml:train.records": "records per embedded institution",
    "client.toml:train.federation_seed": "seed of the embedded federation",
    "client.toml:testing.stall_before": "fault injection: stop answering before this stage",
    "client.toml:testing.stall_round": "only in this round (unset: every round)",
    "client.toml:ckks.secret_context": "this institution's opened CKKS secret context",
}

#: Defaults that depend on the machine, shown in words.
_DEFAULT_SHOWN = {
    "server.toml:server.workers": "the CPUs the server may use",
    "roster.toml:institution.name": "`client-<id>`",
}
_WHO = {"server.toml": ("round", "shared"), "client.toml": ("local", "shared")}
_RECIPE_TABLE = {"server.toml": "task", "client.toml": "train"}
_FILES = ("server.toml", "roster.toml", "client.toml")


def _keygen(out: Path, *args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = fedsec(["keygen", "--out", str(out), "--clients", "4", "--port", "1", *args])
    if code != 0:
        raise RuntimeError(f"fedsec keygen {' '.join(args)} failed ({code})")


def _insert(path: Path, name: str, header: str, lines: str) -> Path:
    """A copy of ``path`` named ``name`` with ``lines`` added at the top of table ``header``."""
    edited = path.with_name(name)
    text = path.read_text()
    if header in text:
        text = text.replace(header + "\n", header + "\n" + lines, 1)
    else:
        text += f"\n{header}\n{lines}"
    edited.write_text(text)
    return edited


def _trace(
    load: Callable[[Path], object], role: str, paths: Iterable[Path], into: list[KeySpec]
) -> None:
    """Load each sample under the trace; keys of the sample itself are filed under ``role``
    (the samples are variants with their own names), those of files it names (the roster)
    under their own name."""
    for path in paths:
        with trace_keys() as keys:
            load(path)
        into.extend(
            dataclasses.replace(key, file=role) if key.file == path.name else key for key in keys
        )


def traced_keys() -> list[KeySpec]:
    """Every key the loaders read over the sample deployments, in read order (repeats kept)."""
    # Imported here: the client's loader resolves model names (torch), the server's does not.
    from clients.client_config import load_client_config

    keys: list[KeySpec] = []
    with tempfile.TemporaryDirectory(prefix="fedsec-config-reference-") as tmp:
        root = Path(tmp)
        _keygen(root / "masking")
        _keygen(root / "ckks", "--backend", "ckks", "--task", "random")
        masking, ckks = root / "masking", root / "ckks"
        server = _insert(
            masking / "server.toml", "mtls.toml", "[server]", 'client_ca = "pki/ca.pem"\n'
        )
        _trace(
            load_server_config,
            "server.toml",
            [
                _insert(server, "dp.toml", "[dp]", "epsilon = 8.0\n"),
                _split_variant(masking / "server.toml"),
                ckks / "server.toml",
            ],
            keys,
        )
        client_1 = masking / "client-1" / "client.toml"
        (client_1.parent / "train.jsonl").write_text("")
        _write_jsonl_variant(client_1)
        tls = (
            'server_name = "localhost"\n'
            'tls_cert = "../pki/client-1.pem"\n'
            'tls_key = "../pki/client-1.key"\n'
        )
        client = _insert(client_1, "tls.toml", "[client]", tls)
        client = _insert(client, "budget.toml", "[policy]", "max_epsilon = 8.0\n")
        client = _insert(
            client, "testing.toml", "[testing]", 'stall_before = "unmask"\nstall_round = 0\n'
        )
        client = _insert(client, "split.toml", "[split]", "activation_noise = 0.5\n")
        (client_1.parent / "pairs.jsonl").write_text("")
        client = _insert(client, "pairs.toml", "[data]", 'preference = "pairs.jsonl"\n')
        _trace(
            load_client_config,
            "client.toml",
            [client, client_1.with_name("jsonl.toml"), ckks / "client-1" / "client.toml"],
            keys,
        )
    return keys


def _split_variant(server_toml: Path) -> Path:
    """The training server as a split-learning coordinator (its [split] table filled in)."""
    split = server_toml.with_name("split.toml")
    text = server_toml.read_text().replace('kind = "train"', 'kind = "split"')
    split.write_text(text + "\n[split]\nclient_bottom = 1\nclient_top = 0\n")
    return split


def _write_jsonl_variant(client_toml: Path) -> None:
    text = client_toml.read_text()
    start = text.index("[data]")
    client_toml.with_name("jsonl.toml").write_text(text[:start] + '[data]\njsonl = "train.jsonl"\n')


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _recipe_rows(file: str) -> list[str]:
    rows = []
    for spec in FIELDS:
        if spec.who not in _WHO[file]:
            continue
        rows.append(
            f"| `{spec.name}` | {_recipe_kind(spec)} | {_value(getattr(EMBEDDED, spec.name))} | "
            f"{_value(getattr(PRETRAINED, spec.name))} | {spec.help} |"
        )
    return rows


def _recipe_kind(spec: FieldSpec) -> str:
    kind = {int: "integer", float: "number", str: "string", bool: "boolean"}.get(
        spec.kind, spec.kind.__name__
    )
    if spec.choices:
        kind += ": " + " \\| ".join(spec.choices)
    return kind


def _grouped(keys: Iterable[KeySpec]) -> dict[str, dict[str, dict[str, KeySpec]]]:
    """file -> table -> key -> its spec (the first read that is not a probe; a key only ever
    probed and then read without a default is optional: its default shows as unset)."""
    files: dict[str, dict[str, dict[str, KeySpec]]] = {}
    probed: set[tuple[str, str]] = set()
    for spec in keys:
        name = re.sub(r"\[\d+\]", "", spec.name)
        if spec.kind == "probe":
            probed.add((spec.file, name))
            continue
        if spec.kind in ("table", "array of tables"):
            continue
        table, _, key = name.rpartition(".")
        entries = files.setdefault(spec.file, {}).setdefault(table, {})
        if key not in entries:
            optional = spec.required and (spec.file, name) in probed
            entries[key] = dataclasses.replace(
                spec, name=name, required=spec.required and not optional
            )
    return files


def undocumented(keys: Iterable[KeySpec]) -> list[str]:
    """Keys the loaders read that :data:`DESCRIPTIONS` does not describe, and descriptions of
    keys no loader reads."""
    seen = {
        f"{file}:{table}.{key}"
        for file, tables in _grouped(keys).items()
        for table, entries in tables.items()
        for key, spec in entries.items()
        if spec.kind != "recipe"
    }
    return sorted(seen ^ set(DESCRIPTIONS))


def render(keys: Iterable[KeySpec]) -> str:
    files = _grouped(keys)
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config loaders by `python -m server.config_reference` (a test checks",
        "that it is current). Every key is checked where it is read: an unknown key, a wrong type",
        "or a value out of range is a one-line error naming the file and the key. Relative paths",
        "are relative to the config file. A key without a default and not marked required is",
        "optional: unset, the feature is off.",
    ]
    for file in _FILES:
        lines += ["", f"## {file}"]
        for table, entries in files[file].items():
            header = f"[[{table}]]" if file == "roster.toml" else f"[{table}]"
            lines += [
                "",
                f"### {header}",
                "",
                "| key | type | default | accepted | what it is |",
                "|---|---|---|---|---|",
            ]
            for key, spec in entries.items():
                if spec.kind == "recipe":
                    continue
                where = f"{file}:{table}.{key}"
                default = _DEFAULT_SHOWN.get(where) or (
                    "required" if spec.required else _value(spec.default)
                )
                limits = spec.limits.replace("|", "\\|")
                what = DESCRIPTIONS.get(where, "")
                lines.append(f"| `{key}` | {spec.kind} | {default} | {limits} | {what} |")
        if file in _RECIPE_TABLE:
            lines += [
                "",
                f"### Recipe keys of [{_RECIPE_TABLE[file]}]",
                "",
                "The training recipe (`fl_core/recipe.py`); defaults depend on the base model.",
                "",
                "| key | type | embedded default | pretrained default | what it is |",
                "|---|---|---|---|---|",
                *_recipe_rows(file),
            ]
    return "\n".join(lines) + "\n"


def main() -> int:
    print(render(traced_keys()), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

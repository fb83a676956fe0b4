"""What the fedsec workflow tells a Flower client about a round, as the bytes the client binds.

Pure (numpy only, no ``flwr``): the mod and the workflow both import it, and tests read it
without Flower installed.

* :class:`FlowerRound` — one round's :class:`~fl_core.round.RoundPlan` (session id, cohort of
  fedsec client ids, (k, t, quorum), DP floor, codec), the strategy whose client-side rule turns
  an update into a contribution, and the local-training options. It travels as one canonical
  JSON document (:meth:`FlowerRound.to_bytes`); the client decodes it strictly and signs, inside
  every advert and survivor-set signature, a digest of *those exact bytes* and of the global
  model it received (:func:`round_binding`), so a server that shows different plans or models
  to different clients is caught by the consistency check, as in fedsec's own transport.
* :func:`join_signed_bytes` — what a client signs to tell the workflow which roster identity
  answers at which Flower node id. Flower node ids are routing labels, not identities.
* :func:`arrays_digest` / :func:`flatten` — a model given as named float32 arrays (a Flower
  ``ArrayRecord``) as the flat vector fedsec aggregates, and its digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_core.errors import FLError, UpdateLayoutError
from fl_core.round import RoundCodec, RoundPlan
from fl_core.strategies import ClientOptions
from secagg.dp.encoder import DpParams
from secagg.dp.noise import NoiseSpec
from secagg.encoding import QuantizationParams
from secagg.ids import id_bytes
from secagg.params import SessionShape

PLAN_VERSION = 1
_JOIN_DOMAIN = b"fedsec/flower/v1/join"
_BINDING_DOMAIN = b"fedsec/flower/v1/round-binding"
_ARRAYS_DOMAIN = b"fedsec/flower/v1/arrays"
#: Bytes of the workflow's join challenge.
NONCE_BYTES = 32

# How fedsec's messages ride in Flower's records. Every fedsec message is a Flower "train"
# message whose content holds the ConfigRecord RECORD: {"stage": one of the STAGE_* names,
# "payload": bytes}; the setup message also holds the global model as the ArrayRecord "arrays".
RECORD = "fedsec"
#: Where the mod keeps a node's session between messages (``Context.state``, never sent).
STATE = "fedsec.session"
STAGE_JOIN = "join"  # payload: the workflow's nonce; reply adds "client_id", "signature"
STAGE_SETUP = "setup"  # payload: FlowerRound.to_bytes(); reply payload: first client message
STAGE_SECAGG = "secagg"  # payload: a canonical secagg message (secagg.messages) either way
STAGE_ABORT = "abort"  # reply only: the client left the round; payload: the reason (UTF-8)
STAGE_END = "end"  # the server gave up on the round; payload: why. The client erases its session


class FlowerPlanError(FLError, ValueError):
    """Bytes that are not a round plan this version of fedsec reads (refused before training)."""


@dataclass(frozen=True)
class FlowerRound:
    """One round as the workflow fixes it and every cohort member receives it."""

    plan: RoundPlan
    strategy: str
    options: ClientOptions

    def __post_init__(self) -> None:
        if self.options.server_control is not None:
            raise FlowerPlanError(
                "SCAFFOLD's server control variate does not travel in a Flower round plan; "
                "use a strategy without control variates"
            )

    def to_bytes(self) -> bytes:
        p = self.plan
        doc = {
            "version": PLAN_VERSION,
            "round": p.index,
            "session_id": p.session_id.hex(),
            "cohort": list(p.cohort),
            "threshold": p.shape.threshold,
            "neighbours": p.shape.neighbours,
            "quorum": p.shape.quorum,
            "min_survivors": p.min_survivors,
            "codec": _codec_doc(p.codec),
            "strategy": self.strategy,
            "lr": self.options.lr,
            "prox_mu": self.options.prox_mu,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> FlowerRound:
        """Strict inverse of :meth:`to_bytes`: exact keys and types, canonical form only."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FlowerPlanError(f"round plan is not JSON: {exc}") from None
        d = _Doc(doc, "round plan")
        d.keys({"version", "round", "session_id", "cohort", "threshold", "neighbours", "quorum",
                "min_survivors", "codec", "strategy", "lr", "prox_mu"})  # fmt: skip
        if d.integer("version") != PLAN_VERSION:
            raise FlowerPlanError(f"round plan version {doc['version']}, this fedsec reads 1")
        neighbours = doc["neighbours"]
        if neighbours is not None:
            neighbours = d.integer("neighbours")
        lr = None if doc["lr"] is None else d.number("lr")
        plan = RoundPlan(
            d.integer("round"),
            d.hex_bytes("session_id"),
            tuple(d.integers("cohort")),
            SessionShape(d.integer("threshold"), neighbours, d.integer("quorum")),
            _codec_from(_Doc(doc["codec"], "codec")),
            d.integer("min_survivors"),
        )
        out = cls(plan, d.string("strategy"), ClientOptions(lr, d.number("prox_mu")))
        if out.to_bytes() != data:
            raise FlowerPlanError("round plan is not in canonical form")
        return out


def _codec_doc(codec: RoundCodec) -> dict[str, Any]:
    if codec.dp is not None:
        p = codec.dp
        return {
            "kind": "dp",
            "contribution_size": codec.contribution_size,
            "ring_bits": p.ring_bits,
            "dim": p.dim,
            "clip": p.clip,
            "scale": p.scale,
            "mechanism": p.noise.mechanism,
            "stddev": p.noise.stddev,
            "seed": p.seed.hex(),
            "max_clients": p.max_clients,
            "beta": p.beta,
        }
    q = codec.quant
    if q is None:  # RoundCodec guarantees one of the two
        raise FlowerPlanError("a codec with neither quantisation nor DP")
    return {
        "kind": "plain",
        "contribution_size": codec.contribution_size,
        "ring_bits": q.ring_bits,
        "clip": q.clip,
        "scale": q.scale,
        "max_clients": q.max_clients,
        "max_weight": q.max_weight,
        "weighted": q.weighted,
    }


def _codec_from(d: _Doc) -> RoundCodec:
    kind = d.string("kind")
    size = d.integer("contribution_size")
    if kind == "plain":
        d.keys({"kind", "contribution_size", "ring_bits", "clip", "scale", "max_clients",
                "max_weight", "weighted"})  # fmt: skip
        quant = QuantizationParams(
            d.integer("ring_bits"),
            d.number("clip"),
            d.number("scale"),
            d.integer("max_clients"),
            d.integer("max_weight"),
            d.boolean("weighted"),
        )
        return RoundCodec(size, quant=quant)
    if kind == "dp":
        d.keys({"kind", "contribution_size", "ring_bits", "dim", "clip", "scale", "mechanism",
                "stddev", "seed", "max_clients", "beta"})  # fmt: skip
        mechanism: Any = d.string("mechanism")
        dp = DpParams(
            d.integer("ring_bits"),
            d.integer("dim"),
            d.number("clip"),
            d.number("scale"),
            NoiseSpec(mechanism, d.number("stddev")),
            d.hex_bytes("seed"),
            d.integer("max_clients"),
            d.number("beta"),
        )
        return RoundCodec(size, dp=dp)
    raise FlowerPlanError(f"unknown codec kind {kind!r}")


class _Doc:
    """Typed reads of one JSON object; anything else is a :class:`FlowerPlanError`."""

    def __init__(self, doc: object, what: str) -> None:
        if not isinstance(doc, dict):
            raise FlowerPlanError(f"{what} must be a JSON object")
        self.doc: dict[str, Any] = doc
        self.what = what

    def keys(self, expected: set[str]) -> None:
        if set(self.doc) != expected:
            missing, extra = sorted(expected - set(self.doc)), sorted(set(self.doc) - expected)
            raise FlowerPlanError(f"{self.what}: missing keys {missing}, unknown keys {extra}")

    def _get(self, key: str) -> Any:
        if key not in self.doc:
            raise FlowerPlanError(f"{self.what}: missing key {key!r}")
        return self.doc[key]

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FlowerPlanError(f"{self.what}: {key} must be a non-negative integer")
        return value

    def integers(self, key: str) -> list[int]:
        values = self._get(key)
        if not isinstance(values, list) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in values
        ):
            raise FlowerPlanError(f"{self.what}: {key} must be a list of integers")
        return values

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FlowerPlanError(f"{self.what}: {key} must be a number")
        if not math.isfinite(value):
            raise FlowerPlanError(f"{self.what}: {key} must be finite")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise FlowerPlanError(f"{self.what}: {key} must be true or false")
        return value

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise FlowerPlanError(f"{self.what}: {key} must be a string")
        return value

    def hex_bytes(self, key: str) -> bytes:
        try:
            return bytes.fromhex(self.string(key))
        except ValueError:
            raise FlowerPlanError(f"{self.what}: {key} must be hex") from None


# --- binding, join, arrays ---------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def round_binding(plan_bytes: bytes, model_digest: bytes) -> bytes:
    """What a client binds of its round (inside ``RoundPlan.client_context``): the exact plan
    bytes it received and the digest of the global model it trains from."""
    return hashlib.sha256(_BINDING_DOMAIN + _lp(plan_bytes) + _lp(model_digest)).digest()


def join_signed_bytes(nonce: bytes, run_id: int, node_id: int, client_id: int) -> bytes:
    """A client's answer to the workflow's join challenge: "the roster's ``client_id`` answers
    at Flower node ``node_id`` of run ``run_id``" (the nonce makes it fresh)."""
    return (
        _JOIN_DOMAIN
        + _lp(nonce)
        + struct.pack(">QQ", run_id & (2**64 - 1), node_id & (2**64 - 1))
        + id_bytes(client_id)
    )


Layout = tuple[tuple[str, tuple[int, ...]], ...]


def layout_of(arrays: Iterable[tuple[str, np.ndarray]]) -> Layout:
    """Names and shapes of a model given as named float32 arrays (refuses other dtypes)."""
    out = []
    for name, array in arrays:
        if array.dtype != np.float32:
            raise UpdateLayoutError(
                f"array {name!r} is {array.dtype}; fedsec aggregates float32 arrays only"
            )
        out.append((name, tuple(int(s) for s in array.shape)))
    return tuple(out)


def flatten(arrays: Mapping[str, np.ndarray], layout: Layout) -> npt.NDArray[np.float32]:
    """The arrays of ``layout`` concatenated in its order; names and shapes must match."""
    if [n for n, _ in layout] != list(arrays):
        expected = [n for n, _ in layout]
        raise UpdateLayoutError(
            f"arrays {list(arrays)[:5]} do not match the global model's {expected[:5]} "
            "(names and order)"
        )
    parts = []
    for name, shape in layout:
        array = np.asarray(arrays[name])
        if tuple(array.shape) != shape or array.dtype != np.float32:
            raise UpdateLayoutError(
                f"array {name!r} is {array.dtype}{list(array.shape)}, expected float32{list(shape)}"
            )
        parts.append(array.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, npt.NDArray[np.float32]]:
    """Inverse of :func:`flatten`."""
    total = sum(math.prod(shape) for _, shape in layout)
    if vector.size != total:
        raise UpdateLayoutError(f"vector has {vector.size} elements, the layout {total}")
    out: dict[str, npt.NDArray[np.float32]] = {}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = vector[offset : offset + size].astype(np.float32).reshape(shape)
        offset += size
    return out


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 over every (name, dtype, shape, bytes) in order: the model a client received."""
    h = hashlib.sha256(_ARRAYS_DOMAIN)
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        h.update(_lp(name.encode()) + _lp(a.dtype.str.encode()))
        h.update(_lp(struct.pack(f">{a.ndim}Q", *a.shape)) + _lp(a.tobytes()))
    return h.digest()

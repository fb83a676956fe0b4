"""One federated round, written once: how a contribution enters the secure sum and comes out.

Every driver of a round — the in-process federation (:mod:`fl_core.federation`), the gRPC
coordinator (:mod:`server.rounds`) and its client (:mod:`clients.transport`), the canary audit
(:mod:`proofs.canary`) — goes through the objects here, so there is one encoding, one decoding
and one set of session parameters, and no copy can drift from another. Nothing here does I/O or
imports torch: the drivers train, move bytes and keep time.

* :class:`RoundCodec` — a contribution (the strategy's float vector and an integer weight) to a
  ring vector for the secure sum, and the released ring sum back to floats: plain fixed-point
  quantisation (:mod:`secagg.encoding`) or, with distributed DP, clip-rotate-round-noise
  (:mod:`secagg.dp.encoder`), with the round's public rotation seed.
* :class:`EncodingSpec` — what fixes a federation's codec; one :class:`RoundCodec` per round.
* :func:`client_contribution` — the client's step from its local update to the codec's input,
  by the strategy's client-side rule.
* :class:`RoundPlan` — what the coordinator fixes for one masking round and every client binds:
  index, session id, cohort, graph/threshold/quorum (against an active server,
  :func:`secagg.params.session_shape`), the DP release floor and the codec;
  :meth:`RoundPlan.secagg_params` are the session's parameters, :meth:`RoundPlan.client_context`
  what each client signs with them (with :func:`round_context`: model, round, options).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fl_core.strategies import AggregateInput, ClientOptions, Strategy
from secagg.dp.calibration import Calibration, release_event
from secagg.dp.encoder import DpEncoder, DpParams
from secagg.encoding import QuantizationParams, decode_sum, encode
from secagg.errors import ConfigurationError
from secagg.params import SessionShape
from secagg.protocol import RoundParams
from secagg.ring import RingArray

FloatArray = npt.NDArray[np.float32]

_CONTEXT_DOMAIN = b"fedsec/fl_core/v1/round-context"


@dataclass(frozen=True)
class EncodedContribution:
    vector: RingArray
    #: Share of the contribution the clip changed: coordinates (plain) or the whole vector (DP).
    clipped_fraction: float


@dataclass(frozen=True)
class RoundCodec:
    """A contribution to the ring and the ring sum back, for one round.

    Exactly one of ``quant`` (plain quantisation; weighted when the strategy's clients carry a
    sample count) and ``dp`` (distributed DP; every contribution has weight 1 — a sample count
    is private and unbounded, so it cannot scale a clipped contribution) is set.
    """

    contribution_size: int
    quant: QuantizationParams | None = None
    dp: DpParams | None = None

    def __post_init__(self) -> None:
        if (self.quant is None) == (self.dp is None):
            raise ConfigurationError("a round encodes with quantisation or with DP, exactly one")
        if self.dp is not None and self.dp.dim != self.contribution_size:
            raise ConfigurationError(
                f"DP parameters for {self.dp.dim} coordinates, contributions have "
                f"{self.contribution_size}"
            )

    @property
    def ring_bits(self) -> int:
        return self.dp.ring_bits if self.dp is not None else self._quant.ring_bits

    @property
    def encoded_dim(self) -> int:
        """Length of the ring vector each client contributes."""
        if self.dp is not None:
            return self.dp.encoded_dim
        return self._quant.encoded_dim(self.contribution_size)

    @property
    def weighted(self) -> bool:
        return self.quant is not None and self.quant.weighted

    @property
    def _quant(self) -> QuantizationParams:
        if self.quant is None:
            raise ConfigurationError("this round encodes with DP, not quantisation")
        return self.quant

    def with_fresh_rotation(self) -> RoundCodec:
        """The same codec with a new public DP rotation seed, drawn independently of every
        update (one per round); unchanged without DP."""
        if self.dp is None:
            return self
        return dataclasses.replace(self, dp=dataclasses.replace(self.dp, seed=os.urandom(32)))

    def encode(self, contribution: np.ndarray, weight: int) -> EncodedContribution:
        """One client's ring vector: ``weight * contribution`` and the weight (plain), or the
        clipped, rotated, rounded and noised contribution (DP, weight 1)."""
        if contribution.size != self.contribution_size:
            raise ConfigurationError(
                f"contribution has {contribution.size} coordinates, the round expects "
                f"{self.contribution_size}"
            )
        if self.dp is not None:
            if weight != 1:
                raise ConfigurationError("with DP every contribution has weight 1")
            encoder = DpEncoder(self.dp)
            vector = encoder.encode(contribution)
            stats = encoder.last_stats
            return EncodedContribution(vector, 1.0 if stats is not None and stats.clipped else 0.0)
        encoded = encode(contribution, self._quant, weight)
        return EncodedContribution(encoded.vector, encoded.clipped / max(contribution.size, 1))

    def decode(self, ring_sum: RingArray, contributors: int) -> AggregateInput:
        """The released ring sum of ``contributors`` clients as the strategy's input."""
        if self.dp is not None:
            total = DpEncoder(self.dp).decode_sum(ring_sum, contributors)
            return AggregateInput(total.astype(np.float64), float(contributors), contributors)
        decoded = decode_sum(ring_sum, self._quant, contributors)
        return AggregateInput(decoded.total.astype(np.float64), decoded.weight, contributors)

    def canonical_bytes(self) -> bytes:
        """What a client binds of the codec (inside :meth:`RoundPlan.context`)."""
        if self.dp is not None:
            p = self.dp
            return (
                b"dp"
                + struct.pack(">IQddQd", p.ring_bits, p.dim, p.clip, p.scale, p.max_clients, p.beta)
                + p.noise.mechanism.encode()
                + struct.pack(">d", p.noise.stddev)
                + _lp(p.seed)
            )
        q = self._quant
        return b"plain" + struct.pack(
            ">IQddQQ?",
            q.ring_bits,
            self.contribution_size,
            q.clip,
            q.scale,
            q.max_clients,
            q.max_weight,
            q.weighted,
        )


def _lp(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def round_context(index: int, global_vector: FloatArray, options: ClientOptions) -> bytes:
    """The digest every client of a round signs (inside :meth:`RoundPlan.client_context`): the
    global model it trains from, the round and the strategy's options for it (learning rate,
    FedProx mu, SCAFFOLD's server control variate). A server that sends different models or
    options to different clients is caught by the protocol's consistency check."""
    parts = [
        _CONTEXT_DOMAIN,
        struct.pack(">Q", index),
        _lp(hashlib.sha256(np.ascontiguousarray(global_vector, "<f4").tobytes()).digest()),
        struct.pack(">dd", options.prox_mu, -1.0 if options.lr is None else options.lr),
    ]
    control = options.server_control
    if control is not None:
        parts.append(_lp(hashlib.sha256(np.ascontiguousarray(control, "<f4").tobytes()).digest()))
    return hashlib.sha256(b"".join(parts)).digest()


@dataclass(frozen=True)
class EncodingSpec:
    """What fixes a federation's codec; :meth:`codec` is the codec of one round's cohort.

    With DP the parameters come from the run's calibration (sized for the largest cohort) and
    every round gets a fresh public rotation seed; without it the quantisation is fitted to the
    cohort so the sum cannot wrap.
    """

    contribution_size: int
    ring_bits: int
    clip: float
    max_weight: int = 1
    weighted: bool = True
    dp: DpParams | None = None

    def codec(self, cohort_size: int) -> RoundCodec:
        if self.dp is not None:
            if cohort_size > self.dp.max_clients:
                raise ConfigurationError(
                    f"a cohort of {cohort_size}: the DP encoding was sized for at most "
                    f"{self.dp.max_clients} contributors"
                )
            return RoundCodec(self.contribution_size, dp=self.dp).with_fresh_rotation()
        quant = QuantizationParams.fit(
            self.ring_bits, self.clip, cohort_size, self.max_weight, weighted=self.weighted
        )
        return RoundCodec(self.contribution_size, quant=quant)


def release_record(
    calibration: Calibration, contributors: int, delta: float, epsilon_target: float
) -> dict[str, Any]:
    """The DP fields of a released round's metrics record: the release's privacy event (what
    the audit composes), and the calibration it came from."""
    event = release_event(calibration.params, contributors)
    return {
        "mechanism": calibration.params.noise.mechanism,
        "dp_event": event.to_dict(),
        "noise_multiplier": calibration.noise_multiplier,
        "delta": delta,
        "epsilon_target": epsilon_target,
    }


def client_contribution(
    strategy: Strategy,
    delta: np.ndarray,
    num_samples: int,
    control_delta: np.ndarray | None,
    *,
    dp: bool,
) -> tuple[np.ndarray, int]:
    """What one client feeds the codec: its contribution divided by its weight, and the integer
    weight the codec multiplies back (1 with DP, where a sample count cannot scale a clipped
    contribution). ``strategy`` only supplies the client-side rule (its contribution and
    weight); a client builds one from the strategy's name."""
    contribution = strategy.contribution(delta, num_samples, control_delta)
    weight = strategy.client_weight(num_samples)
    unit = contribution.astype(np.float64) / weight
    return unit, 1 if dp else int(weight)


@dataclass(frozen=True)
class RoundPlan:
    """One masking round as the coordinator fixes it and every cohort member receives it."""

    index: int
    session_id: bytes
    cohort: tuple[int, ...]
    shape: SessionShape
    codec: RoundCodec
    #: The floor the DP noise is calibrated for (0: no floor beyond t and the quorum).
    min_survivors: int = 0

    def secagg_params(self) -> RoundParams:
        return RoundParams(
            session_id=self.session_id,
            ring_bits=self.codec.ring_bits,
            dim=self.codec.encoded_dim,
            threshold=self.shape.threshold,
            cohort=self.cohort,
            neighbours=self.shape.neighbours,
            quorum=self.shape.quorum,
            min_survivors=self.min_survivors,
        )

    def client_context(self, context: bytes) -> bytes:
        """What a client signs in the session: the round's context (:func:`round_context`, or the
        exact round configuration it received) and the codec it encodes with."""
        return _lp(context) + _lp(self.codec.canonical_bytes())

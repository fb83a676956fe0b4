"""How a round's contributions become one released aggregate: the aggregation backends.

:class:`fl_core.federation.Federation` hands a backend the cohort's *unweighted* contribution
vectors (``units``), their integer weights and a :class:`RoundContext`; the backend runs the
cryptography and returns a :class:`SecureAggregate`: the released sum (:class:`AggregateInput`),
who is in it, timings, upload sizes, the server's record of the round, and the check of the
released mean against the plaintext FedAvg of the same vectors (exceeding the bound raises
:class:`SecureAggregateMismatch`, and nothing is released).

- :class:`MaskingBackend` -- pairwise masking (Bonawitz et al. / SecAgg+, :mod:`secagg`): integer
  encoding in Z_2^b, a full protocol session per round, optional distributed DP.
- :class:`CkksBackend` -- CKKS homomorphic encryption (:mod:`secagg.he`): the federation's key is
  dealt once; each round runs the sans-IO sessions of :mod:`secagg.he.session` (the same ones the
  gRPC server and client run): the server adds ciphertexts under the public context only, the
  round's decryptor opens the aggregate only if it is the sum of the claimed contributors' fresh
  uploads. Its trust model is weaker (:data:`CKKS_TRUST_MODEL`) and DP is not offered with it.

Both weight the same way: a client submits ``w * clip(x)`` and ``w`` (inside the sum), so the
server learns only the sums. Numpy only: no torch here.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fl_core.errors import FLError
from fl_core.round import EncodingSpec, RoundPlan
from fl_core.strategies import AggregateInput, reference_sum
from secagg.encoding import QuantizationParams
from secagg.he import (
    CKKSParams,
    HeClientSession,
    HeRoundSpec,
    HeServerSession,
    KeyAnnouncement,
    PublicContext,
    SecretContext,
    generate_federation_keys,
    open_secret_context,
    seal_secret_context,
)
from secagg.he.params import worst_slot_value
from secagg.keys import AgreementKeyPair
from secagg.params import SessionShape
from secagg.protocol import ClientPolicy, Stage
from secagg.simulate import Simulation, make_identities
from secagg.transcript import Transcript

#: The backends ``FederationConfig.backend`` and ``fedsec simulate --backend`` accept.
BACKENDS = ("masking", "ckks")
#: Relative error of rounding a float64 to float32 (round to nearest): |fl(x) - x| <= 2^-24 |x|.
_FLOAT32_REL = 2.0**-24
#: CKKS scale when the worst-case sum leaves room for it (precision ~2^-40 per unit of scale).
CKKS_MAX_SCALE_BITS = 40
#: One 60-bit data prime plus SEAL's 60-bit special prime: 120 bits at N = 8192, 192-bit security.
CKKS_MODULUS_BITS = (60, 60)

CKKS_TRUST_MODEL = (
    "The server holds only the public CKKS context (no secret key, no tag key) and adds "
    "ciphertexts. What holds against the server alone: it cannot decrypt an upload, and the "
    "round's decryptor (the lowest cohort id, fixed before uploads) opens one aggregate per "
    "session and only the sum of the fresh uploads of the contributors the aggregate claims "
    "(at least min_contributors of the cohort, each of whom saw the same round and model): "
    "every slot carries a pad from the federation's tag key, bound to the session, the "
    "contributor, its view of the round and the slot, so one upload scaled or repeated, a "
    "replayed or foreign upload, swapped ciphertexts or a claimed set other than what was added "
    "are refused with nothing released, except with probability at most 2^-forgery_bits per "
    "attempt (proofs/SPEC.md section 9; the server is modelled as combining ciphertexts with "
    "integers or integer polynomials that do not wrap around the data modulus). What does not "
    "hold: every institution holds the secret and tag keys, so any single institution that "
    "obtains another's individual upload (for example by colluding with the server) decrypts it: "
    "CKKS tolerates no colluding institution, where pairwise masking tolerates a server "
    "colluding with up to t - 1 of them; nobody can check that the decryptor released the true "
    "sum; sums of the same institutions across different sessions are not prevented, and DP is "
    "not offered with CKKS."
)


class SecureAggregateMismatch(FLError, RuntimeError):
    """The secure aggregate differs from the plaintext sum by more than the encoding allows."""


@dataclass(frozen=True)
class RoundContext:
    """What a backend needs to know about the round besides the vectors."""

    index: int
    #: What every masking client signs: the digest of the global model it trained from and the
    #: round number (a server serving different models to different clients is caught).
    signed_context: bytes
    #: Cohort members that trained but never upload (simulated dropouts).
    dropouts: frozenset[int] = frozenset()


@dataclass(frozen=True)
class UploadRecord:
    sender: int
    size: int
    digest: bytes  # SHA-256 of the upload's bytes


@dataclass(frozen=True)
class CkksRoundRecord:
    """The server's record of one CKKS aggregation, for the audit.

    What the server received (who, how many bytes, SHA-256), what it added into the released
    aggregate and under which federation key. Individual ciphertexts are not kept: unlike a
    masked input, one of them is readable by every key holder.
    """

    session_id: bytes
    fingerprint: bytes  # SHA-256 of the federation's public context
    cohort: tuple[int, ...]
    threshold: int  # min_contributors: the smallest aggregate a decryptor opens
    uploads: tuple[UploadRecord, ...]
    contributors: tuple[int, ...]
    decryptor: int

    @property
    def neighbours(self) -> None:
        """No neighbour graph: every upload is added (same attribute as a masking transcript)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": "ckks",
            "session_id": self.session_id.hex(),
            "fingerprint": self.fingerprint.hex(),
            "cohort": list(self.cohort),
            "threshold": self.threshold,
            "uploads": [
                {"sender": u.sender, "size": u.size, "digest": u.digest.hex()} for u in self.uploads
            ],
            "contributors": list(self.contributors),
            "decryptor": self.decryptor,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CkksRoundRecord:
        """Inverse of :meth:`to_dict`; KeyError/TypeError/ValueError on a malformed record."""
        if data["backend"] != "ckks":
            raise ValueError(f"not a CKKS round record (backend {data['backend']!r})")
        return cls(
            session_id=bytes.fromhex(data["session_id"]),
            fingerprint=bytes.fromhex(data["fingerprint"]),
            cohort=tuple(int(u) for u in data["cohort"]),
            threshold=int(data["threshold"]),
            uploads=tuple(
                UploadRecord(int(u["sender"]), int(u["size"]), bytes.fromhex(u["digest"]))
                for u in data["uploads"]
            ),
            contributors=tuple(int(u) for u in data["contributors"]),
            decryptor=int(data["decryptor"]),
        )


@dataclass(frozen=True)
class SecureAggregate:
    """What a backend returns for one round."""

    agg: AggregateInput
    contributors: tuple[int, ...]
    session_id: bytes
    record: Transcript | CkksRoundRecord  # the server's record of the round
    stage_s: dict[str, float]
    client_s: float  # mean per uploading client: masking (all PRG expansions) or encryption
    upload: dict[int, int]  # bytes each cohort member sent
    diff: float  # max |secure mean - plaintext mean| over coordinates
    bound: float  # what ``diff`` may not exceed
    clip_fraction: float


class AggregationBackend(Protocol):
    """One way to compute a round's released aggregate."""

    name: str

    @property
    def neighbours(self) -> int | None:
        """The SecAgg+ neighbour-graph degree, or None (complete graph, or no graph at all)."""
        ...

    def aggregate(
        self,
        units: Mapping[int, np.ndarray],
        weights: Mapping[int, int],
        context: RoundContext,
    ) -> SecureAggregate: ...

    def describe(self) -> dict[str, Any]:
        """The backend's public parameters, merged into ``run.json``."""
        ...

    def summary(self) -> str:
        """One line for the console: which backend, with which threshold."""
        ...


def quantization_bound(
    params: QuantizationParams, contributors: int, weight_sum: float, decoded_max_abs: float
) -> float:
    """Largest possible |secure mean - plaintext mean| on any coordinate, masking without DP.

    Each client encodes ``q = round_stochastic(scale * w * clip(x))``; stochastic rounding moves
    each coordinate by less than one unit, i.e. by less than ``step = 1/scale`` in units of
    ``w * x``. The ring sum of ``contributors`` such vectors is exact (secure aggregation adds
    nothing and the encoding is sized never to wrap), so the decoded sum of ``w * clip(x)``
    differs from the plaintext one by less than ``contributors * step`` per coordinate, and the
    weighted mean (the weights travel exactly, as integers) by less than
    ``contributors * step / weight_sum``. :func:`secagg.encoding.decode_sum` returns the sum as
    float32, which adds at most ``2^-24 * |sum|`` per coordinate; that term is included.
    """
    return (contributors * params.step + _FLOAT32_REL * decoded_max_abs) / weight_sum


def ckks_bound(
    params: CKKSParams, contributors: int, weight_sum: float, decrypted_max_abs: float
) -> float:
    """Largest |secure mean - plaintext mean| on any coordinate under CKKS (with overwhelming
    probability).

    The decryption of a sum of ``contributors`` fresh ciphertexts of ``w * clip(x)`` differs from
    the exact sum by at most ``E = params.sum_error_bound(contributors)`` per slot (ten standard
    deviations of the encryption and encoding noise: a Gaussian tail below 1e-22 per slot, see
    :mod:`secagg.he.params`). The decryptor then rounds to the release grid of step
    ``s = params.release_step(contributors)`` (round to nearest: at most ``s / 2`` more) and
    converts to float32 (at most ``2^-24 * |sum|`` more). The summed weight is an integer
    recovered exactly (it is checked against the plaintext one), so the weighted mean differs
    by at most ``(E + s/2 + 2^-24 * |sum|) / weight_sum``.
    """
    error = params.sum_error_bound(contributors) + params.release_step(contributors) / 2
    return (error + _FLOAT32_REL * decrypted_max_abs) / weight_sum


def _check(round_index: int, diff: float, bound: float) -> None:
    if diff > bound:
        raise SecureAggregateMismatch(
            f"round {round_index}: secure and plaintext aggregates differ by {diff:.3g}, "
            f"more than the encoding's bound {bound:.3g}"
        )


def _clipped_reference(
    units: Mapping[int, np.ndarray],
    weights: Mapping[int, int],
    contributors: Sequence[int],
    clip: float,
) -> AggregateInput:
    """The plaintext weighted sum of the same clipped vectors the clients encoded."""
    return reference_sum(
        [weights[u] * np.clip(units[u], -clip, clip) for u in contributors],
        [float(weights[u]) for u in contributors],
    )


def _secure_vs_plain(
    total: np.ndarray,
    weight: float,
    units: Mapping[int, np.ndarray],
    weights: Mapping[int, int],
    contributors: Sequence[int],
    clip: float,
) -> float:
    """Largest |secure mean - plaintext mean| over the coordinates, after checking that the
    released weight sum is exactly the plaintext one (it is an integer sum, so it must be)."""
    reference = _clipped_reference(units, weights, contributors, clip)
    if weight != reference.weight_sum:
        raise SecureAggregateMismatch(
            f"secure weight sum {weight} != plaintext {reference.weight_sum}"
        )
    secure_mean = total.astype(np.float64) / weight
    plain_mean = reference.contribution_sum / reference.weight_sum
    return float(np.max(np.abs(secure_mean - plain_mean)))


class MaskingBackend:
    """Pairwise masking: a full Bonawitz/SecAgg+ session per round (:mod:`secagg.simulate`),
    every contribution encoded and every release decoded by the round's
    :class:`~fl_core.round.RoundCodec` — the same objects the deployed client and server use."""

    name = "masking"

    def __init__(
        self,
        encoding: EncodingSpec,
        shape: SessionShape,
        corrupt_fraction: float,
        dropout_fraction: float,
        min_survivors: int = 0,
    ) -> None:
        self.encoding = encoding
        self.shape = shape
        # With DP: the contributor count the noise is calibrated for, enforced by every session.
        self.min_survivors = min_survivors
        self.corrupt_fraction = corrupt_fraction
        self.dropout_fraction = dropout_fraction

    @property
    def neighbours(self) -> int | None:
        return self.shape.neighbours

    @property
    def min_release(self) -> int:
        """The fewest contributors a round may release (``RoundParams.min_release``)."""
        return max(self.shape.min_release, self.min_survivors)

    def summary(self) -> str:
        protocol = "SecAgg+" if self.neighbours is not None else "SecAgg"
        floor = f", release floor {self.min_release}" if self.min_survivors else ""
        return f"masking ({protocol} t={self.shape.threshold}{floor})"

    def describe(self) -> dict[str, Any]:
        e = self.encoding
        secagg: dict[str, Any] = {
            "protocol": "SecAgg+" if self.neighbours is not None else "SecAgg",
            "ring_bits": e.ring_bits if e.dp is None else e.dp.ring_bits,
            "threshold": self.shape.threshold,
            "quorum": self.shape.quorum,
            "min_release": self.min_release,
            "neighbours": self.neighbours,
            "graph_seed": "committed and revealed by every cohort client (SecAgg+)"
            if self.neighbours is not None
            else "none (complete graph)",
            "corrupt_fraction": self.corrupt_fraction,
            "dropout_fraction": self.dropout_fraction,
            "key_agreement": "X25519 (32-byte public keys)",
            "signatures": "Ed25519 (64-byte signatures)",
            "share_encryption": "AES-256-GCM",
            "mask_prg": "AES-128-CTR",
            "secret_sharing": "Shamir over GF(2^256 + 297)",
            "session_id": "fresh os.urandom(32) per round",
        }
        if e.dp is None:
            q = e.codec(1).quant
            secagg["encoding"] = {
                "clip_per_coordinate": e.clip,
                "max_weight": e.max_weight,
                "weighted": e.weighted,
                "scale_for_a_cohort_of_one": None if q is None else q.scale,
            }
        return {"backend": self.name, "secagg": secagg}

    def aggregate(
        self,
        units: Mapping[int, np.ndarray],
        weights: Mapping[int, int],
        context: RoundContext,
    ) -> SecureAggregate:
        cohort = tuple(sorted(units))
        plan = RoundPlan(
            context.index,
            os.urandom(32),
            cohort,
            self.shape,
            self.encoding.codec(len(cohort)),
            self.min_survivors,
        )
        codec = plan.codec
        encoded = {u: codec.encode(units[u], weights[u]) for u in cohort}
        inputs = {u: e.vector for u, e in encoded.items()}
        clip_fraction = float(np.mean([e.clipped_fraction for e in encoded.values()]))
        params = plan.secagg_params()
        # A dropout advertised its keys and shared them, then never sent its masked input: the
        # survivors' unmask step has to reconstruct its pairwise masks.
        dropouts = {Stage.MASKED_INPUT: context.dropouts} if context.dropouts else None
        # The institutions' own policy: the same threat model the federation's (k, t) are for.
        policy = ClientPolicy(
            corrupt_fraction=self.corrupt_fraction, dropout_fraction=self.dropout_fraction
        )
        sim = Simulation(
            params,
            inputs,
            contexts=dict.fromkeys(cohort, plan.client_context(context.signed_context)),
            dropouts=dropouts,
            policy=policy,
        ).run()
        contributors = sim.result.contributors
        agg = codec.decode(sim.result.sum, len(contributors))
        if codec.quant is None:
            # The noise is part of the mechanism; what secure aggregation must reproduce
            # exactly is the plaintext ring sum of the same noised vectors.
            ring = params.ring
            plain_ring = ring.zeros(params.dim)
            for u in contributors:
                plain_ring = ring.reduce(plain_ring + inputs[u])
            plain = codec.decode(plain_ring, len(contributors)).contribution_sum
            diff = float(np.max(np.abs(agg.contribution_sum - plain)))
            bound = 0.0
        else:
            diff = _secure_vs_plain(
                agg.contribution_sum, agg.weight_sum, units, weights, contributors, codec.quant.clip
            )
            bound = quantization_bound(
                codec.quant,
                len(contributors),
                agg.weight_sum,
                float(np.max(np.abs(agg.contribution_sum))),
            )
        _check(context.index, diff, bound)
        return SecureAggregate(
            agg=agg,
            contributors=contributors,
            session_id=params.session_id,
            record=sim.transcript,
            stage_s=sim.stage_seconds,
            client_s=float(np.mean(list(sim.client_mask_seconds.values()))),
            upload=sim.upload_bytes,
            diff=diff,
            bound=bound,
            clip_fraction=clip_fraction,
        )


def ckks_params(clip: float, cohort: int, max_weight: int, min_contributors: int) -> CKKSParams:
    """The CKKS parameters of a federation: N = 8192 and :data:`CKKS_MODULUS_BITS`, weighted,
    with the largest scale up to 2^40 that still holds the worst-case slot of a sum (updates and
    their integrity pads, :func:`secagg.he.params.worst_slot_value`) under the data prime with the
    two bits of headroom CKKSParams requires. :class:`secagg.errors.ConfigurationError` when even
    2^20 does not fit.
    """
    worst = worst_slot_value(cohort, max_weight, clip)  # updates and their integrity pads
    # CKKSParams needs worst < 2^(data_bits - scale_bits - 2), and 2^(floor(log2 w) + 1) > w.
    data_bits = CKKS_MODULUS_BITS[0]
    scale_bits = min(CKKS_MAX_SCALE_BITS, data_bits - 3 - math.floor(math.log2(worst)))
    return CKKSParams(
        clip=clip,
        max_clients=cohort,
        max_weight=max_weight,
        weighted=True,
        min_contributors=min_contributors,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=CKKS_MODULUS_BITS,
        scale_bits=scale_bits,
    )


class CkksBackend:
    """CKKS: clients encrypt, the server adds under the public context, one institution decrypts.

    The constructor runs the key distribution once for the federation, through the real path
    of :mod:`secagg.he.keys`: the dealer (the institution with the lowest id) generates the
    keys; every institution announces an X25519 key signed with its Ed25519 identity; the dealer
    checks each announcement against the roster and seals its secret context to it; each
    institution checks the dealer's signed announcement (which carries the context fingerprint)
    and opens its copy. The server side (:attr:`server_context`) holds the public context only,
    loaded against the fingerprint the dealer signed.
    """

    name = "ckks"
    #: No neighbour graph: every upload is added.
    neighbours: int | None = None

    def __init__(self, population: Sequence[int], params: CKKSParams, contribution_size: int):
        begin = time.perf_counter()
        self.params = params
        self.contribution_size = contribution_size
        identities, roster = make_identities(population)
        self.dealer = min(population)
        keys = generate_federation_keys(params)
        distribution = os.urandom(32)
        agreements = {u: AgreementKeyPair.generate() for u in population}
        dealer_announcement = KeyAnnouncement.create(
            identities[self.dealer],
            distribution,
            self.dealer,
            agreements[self.dealer],
            keys.fingerprint,
        )
        # Each institution's own copy of the secret key: the simulated clients' side.
        self._secrets: dict[int, SecretContext] = {self.dealer: keys.secret}
        for u in population:
            if u == self.dealer:
                continue
            announcement = KeyAnnouncement.create(identities[u], distribution, u, agreements[u])
            sealed = seal_secret_context(
                keys, agreements[self.dealer], dealer_announcement, announcement, roster
            )
            self._secrets[u] = open_secret_context(
                sealed, agreements[u], u, dealer_announcement, roster, params
            )
        # The server verifies the dealer's announcement, then loads only the public bytes.
        dealer_announcement.verify(roster, distribution)
        self.server_context = PublicContext.from_bytes(
            keys.public.to_bytes(), params, dealer_announcement.fingerprint
        )
        self.key_setup_s = time.perf_counter() - begin

    @classmethod
    def for_federation(
        cls,
        population: Sequence[int],
        clip: float,
        cohort: int,
        max_weight: int,
        min_contributors: int,
        contribution_size: int,
    ) -> CkksBackend:
        """The backend of a federation (:func:`ckks_params`, keys dealt once);
        :class:`secagg.errors.ConfigurationError` when no CKKS parameters fit."""
        params = ckks_params(clip, cohort, max_weight, min_contributors)
        return cls(population, params, contribution_size)

    def summary(self) -> str:
        return (
            f"ckks (N={self.params.poly_modulus_degree}, {self.params.security_bits}-bit, "
            f"min {self.params.min_contributors} contributors)"
        )

    def describe(self) -> dict[str, Any]:
        p = self.params
        return {
            "backend": self.name,
            "ckks": {
                **p.describe(),
                "clip_per_coordinate": p.clip,
                "max_weight": p.max_weight,
                "weighted": p.weighted,
                "min_contributors": p.min_contributors,
                "max_clients": p.max_clients,
                "encryption": "symmetric (clients hold the secret key; the server none)",
                "key_dealer": self.dealer,
                "key_distribution": (
                    "secret context and tag key sealed with AES-256-GCM under HKDF(X25519(dealer, "
                    "member)) bound to a session id and both ids; X25519 keys announced with "
                    "Ed25519 signatures checked against the roster"
                ),
                "fingerprint": self.server_context.fingerprint.hex(),
                "key_setup_s": round(self.key_setup_s, 3),
                "session_id": "fresh os.urandom(32) per round",
                "decryptor": "the lowest institution id of the round's cohort, fixed before "
                "uploads; opens one aggregate per session",
                "aggregate_integrity": (
                    "a pad from HKDF(tag key; session, client, view of the round) and AES-128-CTR "
                    "in every slot; 4 tag slots per ciphertext; the decryptor releases only if "
                    "the claimed contributors' pads cancel"
                ),
                "release_rounding": "decrypted sums rounded to a power-of-two grid above the "
                "CKKS error bound (mitigates key recovery from exact decryptions)",
                "trust_model": CKKS_TRUST_MODEL,
            },
        }

    def aggregate(
        self,
        units: Mapping[int, np.ndarray],
        weights: Mapping[int, int],
        context: RoundContext,
    ) -> SecureAggregate:
        cohort = tuple(sorted(units))
        clip = self.params.clip
        dim = self.contribution_size
        clipped = sum(int(np.count_nonzero(np.abs(units[u]) > clip)) for u in cohort)
        clip_fraction = clipped / (len(cohort) * dim)
        session = os.urandom(32)
        spec = HeRoundSpec(self.params, session, cohort, dim, self.server_context.fingerprint)
        # Each institution's session sees the round and the model it trained from (its view).
        clients = {
            u: HeClientSession(u, self._secrets[u], spec, context.signed_context) for u in cohort
        }
        uploads: dict[int, bytes] = {}
        encrypt_s: dict[int, float] = {}
        begin = time.perf_counter()
        for u in cohort:
            if u in context.dropouts:
                continue
            start = time.perf_counter()
            uploads[u] = clients[u].encrypt(units[u], weights[u])
            encrypt_s[u] = time.perf_counter() - start
        encrypted = time.perf_counter()
        server = HeServerSession(self.server_context, spec)
        for u, upload in uploads.items():
            server.receive_update(u, upload)
        # TooFewSurvivors below min_contributors, NoDecryptor if the decryptor dropped out.
        aggregate = server.close_uploads()
        added = time.perf_counter()
        contributors = server.contributors
        decryptor = server.decryptor
        result = clients[decryptor].decrypt(aggregate)
        server.receive_release(decryptor, result)
        decrypted = time.perf_counter()

        diff = _secure_vs_plain(result.total, result.weight, units, weights, contributors, clip)
        bound = ckks_bound(
            self.params,
            len(contributors),
            result.weight,
            float(np.max(np.abs(result.total))),
        )
        _check(context.index, diff, bound)
        record = CkksRoundRecord(
            session_id=session,
            fingerprint=self.server_context.fingerprint,
            cohort=cohort,
            threshold=self.params.min_contributors,
            uploads=tuple(
                UploadRecord(u, len(data), hashlib.sha256(data).digest())
                for u, data in uploads.items()
            ),
            contributors=contributors,
            decryptor=decryptor,
        )
        return SecureAggregate(
            agg=AggregateInput(result.total, result.weight, len(contributors)),
            contributors=contributors,
            session_id=session,
            record=record,
            stage_s={
                "encrypt": encrypted - begin,
                "aggregate": added - encrypted,
                "decrypt": decrypted - added,
            },
            client_s=float(np.mean(list(encrypt_s.values()))),
            upload={u: len(uploads.get(u, b"")) for u in cohort},
            diff=diff,
            bound=bound,
            clip_fraction=clip_fraction,
        )

"""One CKKS aggregation as two sans-IO sessions: the server's and each institution's.

No sockets, threads, clocks or protobuf: :class:`HeRoundSpec` (CKKS parameters, session id,
cohort, dimension, federation fingerprint) describes the round; the server's
:class:`HeServerSession` takes uploads and the decryptor's release in and gives the aggregate out;
an institution's :class:`HeClientSession` turns its update into one upload and, if it is the
round's decryptor, opens the aggregate. The in-process backend (:mod:`fl_core.aggregation`) and
the gRPC server and client (:mod:`server.rounds`, :mod:`clients.transport`) drive these same
objects; protobuf is converted at the edge (:mod:`wire.he_round`).

Why the decryptor is no oracle (the argument is ``proofs/SPEC.md`` §9):

- Every contributor adds to every slot it encrypts a pad derived from the federation's tag key,
  the session, its own id and the SHA-256 of its *view* of the round (the spec and the context it
  trained from: config and model bytes) (:mod:`secagg.he.pads`). The last
  :data:`~secagg.he.params.TAG_SLOTS` slots of every ciphertext carry the pad alone.
- The aggregate names the contributors the server claims it summed. The decryptor refuses a
  claimed set that is not sorted, distinct, inside its cohort and at least the release floor;
  subtracts the pads those contributors would have added *under its own view*; and refuses
  (:class:`AggregateIntegrityError`, nothing released) unless every tag slot is 0 within the CKKS
  error bound and every data slot within the range an honest sum reaches. Only the data slots,
  rounded to the release grid, are released.
- The decryptor is fixed by the spec (the lowest id of the cohort) and opens at most one aggregate
  per session. Every contributor's pads bind its view, and a client takes part in a session id
  once, so two releases of one session are sums over disjoint sets of contributors: the server
  cannot obtain two sums whose difference is one institution's update.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from secagg.errors import (
    ConfigurationError,
    DuplicateClient,
    EncodingError,
    PolicyViolation,
    ProtocolAbort,
    SecAggError,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
)
from secagg.he.backend import (
    KIND_AGGREGATE,
    KIND_UPDATE,
    DecryptedSum,
    Envelope,
    HEAggregator,
    clipped_values,
    data_mask,
    decrypt_rows,
    encrypt_rows,
    from_slots,
    load_chunks,
    pack,
    to_slots,
    unpack,
)
from secagg.he.errors import (
    AggregateIntegrityError,
    CiphertextFormatError,
    ContextMismatch,
    NoDecryptor,
)
from secagg.he.keys import FINGERPRINT_BYTES, PublicContext, SecretContext
from secagg.he.pads import pad_key, pad_sum, pad_values
from secagg.he.params import CKKSParams
from secagg.ids import check_client_id, check_session_id
from secagg.protocol import ClientPolicy

_SPEC_DOMAIN = b"fedsec/secagg/he/v1/round"
_VIEW_DOMAIN = b"fedsec/secagg/he/v1/view"


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _params_bytes(params: CKKSParams) -> bytes:
    sizes = params.coeff_mod_bit_sizes
    return struct.pack(
        f">IB{len(sizes)}BBdIIBI",
        params.poly_modulus_degree,
        len(sizes),
        *sizes,
        params.scale_bits,
        params.clip,
        params.max_clients,
        params.max_weight,
        int(params.weighted),
        params.min_contributors,
    )


@dataclass(frozen=True)
class HeRoundSpec:
    """What every party of one CKKS aggregation must agree on.

    ``cohort`` is sorted and distinct; ``params.max_clients`` (the overflow and pad budget) must
    hold it. The decryptor is the lowest id of the cohort: fixed before any upload, so every
    contributor's pads bind it.
    """

    params: CKKSParams
    session_id: bytes
    cohort: tuple[int, ...]
    dim: int
    fingerprint: bytes

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        if not self.cohort:
            raise ConfigurationError("a round needs a non-empty cohort")
        for u in self.cohort:
            check_client_id(u)
        if list(self.cohort) != sorted(set(self.cohort)):
            raise ConfigurationError("the cohort must be sorted and distinct")
        if len(self.cohort) > self.params.max_clients:
            raise ConfigurationError(
                f"a cohort of {len(self.cohort)} exceeds max_clients = {self.params.max_clients}"
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise EncodingError(f"dimension must be a positive integer, got {self.dim!r}")
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ConfigurationError(f"a fingerprint is {FINGERPRINT_BYTES} bytes")

    @property
    def decryptor(self) -> int:
        return self.cohort[0]

    def canonical_bytes(self) -> bytes:
        """One unambiguous encoding (every field length-prefixed) for the view digest."""
        cohort = b"".join(struct.pack(">I", u) for u in self.cohort)
        return _SPEC_DOMAIN + b"".join(
            _field(part)
            for part in (
                self.session_id,
                self.fingerprint,
                struct.pack(">Q", self.dim),
                _params_bytes(self.params),
                cohort,
            )
        )


def view_digest(spec: HeRoundSpec, context: bytes) -> bytes:
    """SHA-256 of the round as one client saw it: the spec and the context it was given (in a
    deployment the round config and global model bytes; in process, the model digest)."""
    return hashlib.sha256(_VIEW_DOMAIN + _field(spec.canonical_bytes()) + _field(context)).digest()


def check_policy(policy: ClientPolicy, spec: HeRoundSpec, client_id: int) -> None:
    """Refuse, before anything is computed, a round below the institution's policy: a cohort
    smaller than ``min_cohort``, a release floor (``min_contributors``) below ``min_threshold``,
    or a cohort this client is not in."""
    problems = []
    if len(spec.cohort) < policy.min_cohort:
        problems.append(f"cohort of {len(spec.cohort)} < policy minimum {policy.min_cohort}")
    if spec.params.min_contributors < policy.min_threshold:
        problems.append(
            f"release floor min_contributors = {spec.params.min_contributors} < policy minimum "
            f"{policy.min_threshold}"
        )
    if client_id not in spec.cohort:
        problems.append(f"client {client_id} is not in the cohort")
    if problems:
        raise PolicyViolation("CKKS round refused: " + "; ".join(problems))


def _key_shape(params: CKKSParams) -> tuple[int, tuple[int, ...], int]:
    return params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.scale_bits


class HeClientStage(StrEnum):
    UPLOAD = "upload"
    UPLOADED = "uploaded"
    RELEASED = "released"
    ABORTED = "aborted"


class HeClientSession:
    """An institution's part in one CKKS round: one upload and, as decryptor, one release."""

    def __init__(
        self,
        client_id: int,
        secret: SecretContext,
        spec: HeRoundSpec,
        context: bytes = b"",
        policy: ClientPolicy | None = None,
    ) -> None:
        self.client_id = check_client_id(client_id)
        self.spec = spec
        self.policy = policy if policy is not None else ClientPolicy()
        check_policy(self.policy, spec, client_id)
        if secret.fingerprint != spec.fingerprint:
            raise ContextMismatch(
                "the round names another federation key than this institution's secret context"
            )
        if _key_shape(secret.params) != _key_shape(spec.params):
            raise ContextMismatch(
                f"the round's CKKS parameters {_key_shape(spec.params)} are not those of this "
                f"institution's key {_key_shape(secret.params)}"
            )
        self._secret: SecretContext | None = secret.for_params(spec.params)
        self._view: bytes | None = view_digest(spec, context)
        self.stage = HeClientStage.UPLOAD

    @property
    def params(self) -> CKKSParams:
        return self.spec.params

    @property
    def is_decryptor(self) -> bool:
        return self.client_id == self.spec.decryptor

    def _keys(self) -> tuple[SecretContext, bytes]:
        if self._secret is None or self._view is None:
            raise UnexpectedMessage(f"this session is over (stage {self.stage.value})")
        return self._secret, self._view

    def _pads(self, secret: SecretContext, view: bytes, clients: Sequence[int]) -> np.ndarray:
        """The sum of the pads ``clients`` add under ``view`` (integers, exact)."""
        keys = [pad_key(secret.tag_key, self.spec.session_id, u, view) for u in clients]
        return pad_sum(keys, self.params, self.params.chunk_count(self.spec.dim))

    def encrypt(self, update: np.ndarray, weight: int = 1) -> bytes:
        """This client's one upload: ``update`` clipped to ±clip, times ``weight`` (weighted
        rounds append the weight as one more value), laid out over ``chunk_count(dim)``
        ciphertexts with this client's pad added to every slot."""
        if self.stage is not HeClientStage.UPLOAD:
            raise UnexpectedMessage(f"this client already uploaded (stage {self.stage.value})")
        secret, view = self._keys()
        values = clipped_values(update, weight, self.params, self.spec.dim)
        plain = to_slots(values, self.params, self.spec.dim)
        plain += pad_values(self._pads(secret, view, (self.client_id,)), self.params)
        chunks = encrypt_rows(secret, plain)
        self.stage = HeClientStage.UPLOADED
        return pack(
            Envelope(
                KIND_UPDATE,
                self.spec.session_id,
                secret.fingerprint,
                values.size,
                (self.client_id,),
                chunks,
            )
        )

    def decrypt(self, aggregate: bytes) -> DecryptedSum:
        """Open the server's aggregate, once, as this round's decryptor; every check of the
        module docstring first. Any refusal aborts the session and releases nothing."""
        if self.stage in (HeClientStage.RELEASED, HeClientStage.ABORTED):
            raise UnexpectedMessage(f"this session is over (stage {self.stage.value})")
        try:
            if self.stage is not HeClientStage.UPLOADED:
                raise UnexpectedMessage("asked to decrypt before this client uploaded")
            if not self.is_decryptor:
                raise UnexpectedMessage(
                    f"client {self.client_id} is not this round's decryptor "
                    f"(client {self.spec.decryptor} is)"
                )
            released = self._open(aggregate)
        except SecAggError:
            self.abort()
            raise
        self.stage = HeClientStage.RELEASED
        self._wipe()
        return released

    def _claimed(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(ids)) != len(ids):
            raise DuplicateClient("the aggregate names a contributor twice")
        if list(ids) != sorted(ids):
            raise CiphertextFormatError("the aggregate's contributors are not in increasing order")
        outside = sorted(set(ids) - set(self.spec.cohort))
        if outside:
            raise UnknownClient(f"the aggregate names clients {outside} outside the cohort")
        floor = max(self.params.min_contributors, self.policy.min_threshold)
        if len(ids) < floor:
            raise TooFewSurvivors(
                f"the aggregate claims {len(ids)} contributors; decrypting needs at least {floor}"
            )
        return ids

    def _open(self, aggregate: bytes) -> DecryptedSum:
        secret, view = self._keys()
        params, spec = self.params, self.spec
        envelope = unpack(
            aggregate, params, KIND_AGGREGATE, spec.session_id, spec.dim, len(spec.cohort)
        )
        if envelope.fingerprint != secret.fingerprint:
            raise ContextMismatch("the aggregate was made under another federation key")
        claimed = self._claimed(envelope.ids)
        plain = decrypt_rows(load_chunks(envelope, secret.context, params))
        residual = plain - pad_values(self._pads(secret, view, claimed), params)
        del plain
        n = len(claimed)
        tolerance = params.tag_tolerance(n)
        mask = data_mask(params, spec.dim)
        tags = np.where(mask, 0.0, np.abs(residual)).max(axis=1)
        if not tags.max() <= tolerance:  # NaN-safe: a NaN fails too
            worst = int(np.argmax(tags))
            raise AggregateIntegrityError(
                f"the aggregate is not the sum of this session's uploads of clients "
                f"{list(claimed)} under this client's view of the round: the tag slots of "
                f"ciphertext {worst} are off by {tags[worst]:.3g}, the CKKS error bound is "
                f"{tolerance:.3g}; nothing released"
            )
        values = from_slots(residual, params, spec.dim)
        limit = n * params.client_bound + tolerance
        peak = float(np.max(np.abs(values)))
        if not peak <= limit:
            raise AggregateIntegrityError(
                f"a data slot holds {peak:.3g}, beyond the ±{limit:.3g} a sum of {n} clipped "
                "updates can reach; nothing released"
            )
        step = params.release_step(n)
        values = np.round(values / step) * step
        if not params.weighted:
            return DecryptedSum(values.astype(np.float32), float(n), n)
        weight = float(values[-1])
        rounded = round(weight)
        if abs(weight - rounded) > 0.25 or not n <= rounded <= n * params.max_weight:
            raise AggregateIntegrityError(
                f"decrypted weight sum {weight:.6g} is not an integer in "
                f"[{n}, {n * params.max_weight}]; nothing released"
            )
        return DecryptedSum(values[:-1].astype(np.float32), float(rounded), n)

    def abort(self) -> None:
        """End the session; nothing more is encrypted or released."""
        self.stage = HeClientStage.ABORTED
        self._wipe()

    def _wipe(self) -> None:
        self._secret = None
        self._view = None


class HeStage(StrEnum):
    UPLOAD = "he_upload"
    DECRYPT = "he_decrypt"
    DONE = "done"
    ABORTED = "aborted"


class HeServerSession:
    """The server's side of one CKKS round: add uploads as they arrive, hand the aggregate to
    the decryptor, accept its release. It holds the public context only.

    Stages: ``he_upload`` (each cohort member sends one upload, checked completely and added as
    it arrives; a bad one is refused and its sender no longer awaited), ``he_decrypt`` (the
    aggregate goes to :attr:`decryptor`, which must itself have contributed), ``done``. Any
    abort releases nothing. What the server cannot check: that the decryptor released the true
    sum; the release is bounded (same dimension, the contributor count the server counted, a
    plausible weight) and logged with the decryptor's id.
    """

    def __init__(self, public: PublicContext, spec: HeRoundSpec) -> None:
        if public.fingerprint != spec.fingerprint:
            raise ContextMismatch("the round names another federation key than the server's")
        self.spec = spec
        self.stage = HeStage.UPLOAD
        self.abort_reason = ""
        self._aggregator: HEAggregator | None = HEAggregator(
            public.for_params(spec.params), spec.session_id, spec.dim
        )
        self._contributors: tuple[int, ...] = ()
        self._refused: set[int] = set()
        self._aggregate = b""
        self._release: DecryptedSum | None = None

    @property
    def params(self) -> CKKSParams:
        return self.spec.params

    @property
    def session_id(self) -> bytes:
        return self.spec.session_id

    @property
    def cohort(self) -> frozenset[int]:
        return frozenset(self.spec.cohort)

    @property
    def decryptor(self) -> int:
        return self.spec.decryptor

    @property
    def contributors(self) -> tuple[int, ...]:
        if self._aggregator is not None:
            return tuple(sorted(self._aggregator.contributors))
        return self._contributors

    @property
    def pending(self) -> frozenset[int]:
        """Who the current stage still waits for."""
        if self.stage is HeStage.UPLOAD:
            return self.cohort - set(self.contributors) - self._refused
        if self.stage is HeStage.DECRYPT:
            return frozenset({self.decryptor})
        return frozenset()

    def withdraw(self, sender: int) -> None:
        """``sender`` said it will not upload (it refused the round): stop waiting for it."""
        if self.stage is HeStage.UPLOAD and sender in self.cohort:
            self._refused.add(sender)

    def receive_update(self, sender: int, ciphertext: bytes) -> None:
        """Check and add ``sender``'s upload; on any error nothing is added."""
        if self.stage is not HeStage.UPLOAD or self._aggregator is None:
            raise UnexpectedMessage(f"uploads are closed (stage {self.stage.value})")
        if sender not in self.cohort:
            raise UnknownClient(f"client {sender} is not in this round's cohort")
        if sender in self._refused:
            raise DuplicateClient(f"client {sender}'s upload was already refused this round")
        try:
            self._aggregator.add(sender, ciphertext)
        except DuplicateClient:
            raise
        except SecAggError:
            # Its one upload failed the checks: stop waiting for it.
            self._refused.add(sender)
            raise

    def close_uploads(self) -> bytes:
        """End the upload stage and return the aggregate for :attr:`decryptor`. Aborts
        (releasing nothing) below ``min_contributors`` or when the decryptor did not upload."""
        if self.stage is not HeStage.UPLOAD or self._aggregator is None:
            raise UnexpectedMessage(f"uploads already closed (stage {self.stage.value})")
        self._contributors = self.contributors
        try:
            aggregate = self._aggregator.aggregate()  # TooFewSurvivors below the minimum
            if self.decryptor not in self._contributors:
                raise NoDecryptor(
                    f"the round's decryptor, client {self.decryptor}, did not upload (taken as "
                    "lost); nothing is released"
                )
        except ProtocolAbort as exc:
            self.abort(str(exc))
            raise
        self._aggregator = None
        self._aggregate = aggregate
        self.stage = HeStage.DECRYPT
        return aggregate

    def receive_release(self, sender: int, released: DecryptedSum) -> None:
        """Accept the decrypted sum from the decryptor, after checking its shape; a release that
        fails a check aborts the round."""
        if self.stage is not HeStage.DECRYPT or sender != self.decryptor:
            raise UnexpectedMessage(f"client {sender} was not asked to decrypt this aggregate")
        count = len(self._contributors)
        high = count * self.params.max_weight if self.params.weighted else count
        problem = ""
        if released.total.shape != (self.spec.dim,):
            problem = f"the release has shape {released.total.shape}, the round {self.spec.dim}"
        elif not np.isfinite(released.total).all():
            problem = "the release holds a NaN or an Inf"
        elif released.contributors != count:
            problem = (
                f"the release counts {released.contributors} contributors, the server added {count}"
            )
        elif not count <= released.weight <= high:
            problem = f"the released weight {released.weight:g} is outside [{count}, {high}]"
        if problem:
            self.abort(problem)
            raise AggregateIntegrityError(problem)
        self._release = released
        self._aggregate = b""
        self.stage = HeStage.DONE

    @property
    def result(self) -> DecryptedSum:
        if self._release is None:
            raise TooFewSurvivors("the round has no released sum")
        return self._release

    def abort(self, reason: str) -> None:
        """End the round; the running sum and the aggregate are dropped, nothing is released."""
        self.stage = HeStage.ABORTED
        self.abort_reason = reason
        self._aggregator = None
        self._aggregate = b""
        self._release = None

"""The server side of one secure-aggregation session, as a pure state machine.

The transport feeds every client message to :meth:`ServerSession.receive` (bytes or a decoded
message) and calls :meth:`ServerSession.close_stage` when all expected senders have answered or
the stage deadline has passed; ``close_stage`` returns the messages to send for the next stage.
The stages are ``params.stages``: SecAgg+ sessions start with the graph-seed commitment, and
the neighbour graph is fixed only when every committed client has revealed (a missing reveal
aborts: letting the server choose which reveals count would let it grind the graph).
A bad message from one client raises a specific error and is discarded (the round goes on with
the others); too few survivors at any stage (below t, or up to the masked inputs below the
release floor ``RoundParams.min_release``) aborts the session, and an aborted session releases
nothing — the running sum is wiped.

Masked inputs are summed as they arrive, straight from their packed bytes, so the server never
holds a vector besides the sum. Unmasking removes every self mask of a survivor and every pair
mask between a survivor and a neighbour that dropped after sharing, in one chunked pass
(:func:`secagg.prg.accumulate_masks`), so it runs close to the AES-CTR speed limit.

The heavy steps go through a :class:`SumBackend`: adding each masked input, the unmask stage's
reconstructions (one :class:`UnmaskJob` per secret, :func:`unmask_keys`), and mask removal. By
default they run in this process (:class:`InProcessSum`); the server injects one that spreads
them over worker processes (:mod:`server.parallel_unmask`), which keeps this module free of
processes and threads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

from secagg import shamir
from secagg.errors import (
    DuplicateClient,
    GraphSeedError,
    InconsistentSharesError,
    MessageFormatError,
    ProtocolAbort,
    SecAggError,
    SessionMismatch,
    SumBackendFailure,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
)
from secagg.graph import NeighbourGraph
from secagg.keys import (
    AgreementKeyPair,
    KeyPurpose,
    Roster,
    check_agreement_public_key,
    derive_pair_key,
)
from secagg.messages import (
    SERVER,
    SERVER_MESSAGE_TYPES,
    AdvertiseKeys,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    PeerAdvert,
    SeedCommit,
    SeedCommitments,
    ServerMessage,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    encode_message,
)
from secagg.packing import add_packed
from secagg.prg import accumulate_masks
from secagg.protocol.common import (
    RoundParams,
    Stage,
    advert_signed_bytes,
    consistency_signed_bytes,
    graph_seed,
    seed_commitment,
    self_mask_commitment,
    self_mask_key,
)
from secagg.ring import Ring, RingArray
from secagg.transcript import (
    MessageRecord,
    RejectionRecord,
    ReleaseRecord,
    ShareRequestRecord,
    Transcript,
)

_EXPECTED_KIND: dict[Stage, type] = {
    Stage.SEED_COMMIT: SeedCommit,
    Stage.ADVERTISE_KEYS: AdvertiseKeys,
    Stage.SHARE_KEYS: ShareKeys,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.CONSISTENCY_CHECK: ConsistencySignature,
    Stage.UNMASK: UnmaskResponse,
}


_Job = TypeVar("_Job")
_Result = TypeVar("_Result")


class SumBackend(Protocol):
    """Where the server's heavy work runs: adding a masked input, reconstructing the secrets
    of the unmask stage, removing the masks.

    ``total`` is the session's running sum (a 1-D array of the ring's dtype, wrapping, not
    reduced). A backend checks a payload before it adds anything, and leaves ``total`` unchanged
    when it raises; one that cannot complete a step raises :class:`SumBackendFailure`, which
    aborts the session.
    """

    def map(self, function: Callable[[_Job], _Result], jobs: Sequence[_Job]) -> list[_Result]:
        """``[function(job) for job in jobs]``. ``function`` is a module-level function and the
        jobs plain data, so they may run in other processes; a :class:`SecAggError` a job
        raises is raised as it is (the first one in job order)."""
        ...

    def add_packed(self, total: RingArray, payload: bytes, ring: Ring) -> None:
        """``total += unpack(payload)``; a malformed payload is a ``MessageFormatError``."""
        ...

    def remove_masks(
        self,
        total: RingArray,
        ring: Ring,
        add_keys: Sequence[bytes],
        subtract_keys: Sequence[bytes],
    ) -> None:
        """``total += Σ PRG(add_keys) − Σ PRG(subtract_keys)`` (mod 2^b), as
        :func:`secagg.prg.accumulate_masks` computes it."""
        ...


@dataclass(frozen=True)
class SelfMaskJob:
    """Reconstruct survivor ``owner``'s self-mask seed b_u and derive the key of its mask."""

    session_id: bytes
    owner: int
    shares: tuple[tuple[int, bytes], ...]  # (holder, share of b_u)
    threshold: int
    commitment: bytes  # H(b_u), sent by the owner with its shares


@dataclass(frozen=True)
class DroppedKeyJob:
    """Reconstruct dropped client ``owner``'s masking key and derive its pair-mask keys with
    each surviving neighbour."""

    session_id: bytes
    owner: int
    shares: tuple[tuple[int, bytes], ...]  # (holder, share of s_v^SK)
    threshold: int
    masking_public: bytes  # the s_v it advertised
    survivors: tuple[tuple[int, bytes], ...]  # (u, s_u) for its neighbours u in U3


UnmaskJob = SelfMaskJob | DroppedKeyJob


def unmask_keys(job: UnmaskJob) -> tuple[list[bytes], list[bytes]]:
    """The mask keys one reconstruction yields: (keys to add, keys to subtract) at unmasking.

    A pure function of plain data, so a :class:`SumBackend` may run many at once in other
    processes; a reconstruction that fails or does not match its commitment raises
    :class:`InconsistentSharesError` (or :class:`TooFewSurvivors`).
    """
    sid, v = job.session_id, job.owner
    if isinstance(job, SelfMaskJob):
        seed = shamir.reconstruct(dict(job.shares), job.threshold, f"self mask of {v}")
        if self_mask_commitment(sid, v, seed) != job.commitment:
            raise InconsistentSharesError(
                f"reconstructed self-mask seed of client {v} does not match its commitment"
            )
        return [], [self_mask_key(sid, v, seed)]
    secret = shamir.reconstruct(dict(job.shares), job.threshold, f"masking key of {v}")
    pair = AgreementKeyPair.from_private_bytes(secret)
    if pair.public_bytes != job.masking_public:
        raise InconsistentSharesError(
            f"reconstructed masking key of dropped client {v} does not match its advert"
        )
    add: list[bytes] = []
    subtract: list[bytes] = []
    for u, public in job.survivors:
        key = derive_pair_key(pair.exchange(public), sid, KeyPurpose.MASK, u, v, 16)
        # u added PRG(s_uv) when v > u and subtracted it when v < u: undo that.
        (subtract if v > u else add).append(key)
    return add, subtract


class InProcessSum:
    """The default :class:`SumBackend`: everything in the calling thread."""

    def add_packed(self, total: RingArray, payload: bytes, ring: Ring) -> None:
        add_packed(total, payload, ring)

    def map(self, function: Callable[[_Job], _Result], jobs: Sequence[_Job]) -> list[_Result]:
        return [function(job) for job in jobs]

    def remove_masks(
        self,
        total: RingArray,
        ring: Ring,
        add_keys: Sequence[bytes],
        subtract_keys: Sequence[bytes],
    ) -> None:
        accumulate_masks(total, ring, add_keys, subtract_keys)


@dataclass(frozen=True)
class AggregateResult:
    sum: RingArray  # Σ_{u ∈ contributors} x_u in the ring
    contributors: tuple[int, ...]  # U3: whose inputs the sum contains


class ServerSession:
    """The server's run of one session over ``params.cohort``."""

    def __init__(
        self,
        params: RoundParams,
        roster: Roster,
        record_masked_inputs: bool = True,
        *,
        backend: SumBackend | None = None,
    ) -> None:
        missing = [u for u in params.cohort if u not in roster]
        if missing:
            raise UnknownClient(f"cohort members missing from the roster: {missing[:10]}")
        self.params = params
        self._roster = roster
        self._cohort = frozenset(params.cohort)
        # SecAgg+: fixed once every committed client revealed (see _close_advertise).
        self._graph: NeighbourGraph | None = params.graph(None) if params.is_complete else None
        self._record_masked = record_masked_inputs
        self._backend: SumBackend = backend or InProcessSum()
        self.stage = params.stages[0]
        self.abort_reason: str | None = None
        self._expected: frozenset[int] = frozenset(params.cohort)
        self._got: set[int] = set()  # senders accepted in the current stage
        self._seed_commitments: dict[int, bytes] = {}
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._key_owner: dict[bytes, int] = {}  # advertised public key -> client (O(1) reuse check)
        self._shares: dict[int, ShareKeys] = {}
        self._masked: list[int] = []
        self._sum: RingArray | None = params.ring.zeros(params.dim)
        self._signatures: dict[int, bytes] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._u3: tuple[int, ...] = ()
        self._result: AggregateResult | None = None
        self.masks_removed = 0  # PRG expansions the unmask stage needed (for benchmarks)
        self.transcript = Transcript(
            params.session_id,
            params.ring_bits,
            params.dim,
            params.threshold,
            params.neighbours,
            params.cohort,
            min_survivors=params.min_survivors,
            quorum=params.signature_quorum,
        )

    # --- public API ---------------------------------------------------------------------------

    @property
    def expected_senders(self) -> frozenset[int]:
        """Clients the current stage waits for (those sent a message in the previous stage)."""
        return self._expected

    @property
    def pending(self) -> frozenset[int]:
        return self._expected - self._got

    @property
    def result(self) -> AggregateResult:
        if self._result is None:
            raise UnexpectedMessage(f"no result: the session is at stage {self.stage.value}")
        return self._result

    def receive(self, data: bytes | ClientMessage) -> None:
        """Validate and absorb one client message; raises (and discards it) if it is bad."""
        stage = self.stage
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                raw = bytes(data)
                decoded = decode_message(raw)
            else:
                decoded = data
                raw = encode_message(data)
            if isinstance(decoded, SERVER_MESSAGE_TYPES):
                raise UnexpectedMessage(f"{type(decoded).__name__} is a server message")
            msg: ClientMessage = decoded
            self._check_envelope(msg)
            self._HANDLERS[type(msg)](self, msg)
            self._got.add(msg.sender)
        except SecAggError as exc:
            sender = getattr(data, "sender", -1)
            self.transcript.rejections.append(
                RejectionRecord(stage.value, sender, type(exc).__name__, str(exc))
            )
            raise
        self.transcript.messages.append(
            MessageRecord(
                stage.value,
                type(msg).__name__,
                msg.session_id,
                msg.sender,
                msg.recipient,
                len(raw),
                hashlib.sha256(raw).digest(),
            )
        )

    def close_stage(self) -> list[ServerMessage]:
        """End the current stage with whoever answered; returns the next stage's messages."""
        closers: dict[Stage, Callable[[], list[ServerMessage]]] = {
            Stage.SEED_COMMIT: self._close_seed_commit,
            Stage.ADVERTISE_KEYS: self._close_advertise,
            Stage.SHARE_KEYS: self._close_share,
            Stage.MASKED_INPUT: self._close_masked,
            Stage.CONSISTENCY_CHECK: self._close_consistency,
            Stage.UNMASK: self._close_unmask,
        }
        closer = closers.get(self.stage)
        if closer is None:
            why = f" ({self.abort_reason})" if self.abort_reason else ""
            raise UnexpectedMessage(f"the session is {self.stage.value}{why}; no stage to close")
        try:
            return closer()
        except ProtocolAbort as exc:
            self._abort(str(exc))
            raise

    def abort(self, reason: str) -> None:
        """Abandon the session (e.g. the transport gave up); nothing is released."""
        self._abort(reason)

    def withdraw(self, client: int) -> None:
        """``client`` said it leaves the session (it refused the round or aborted): the current
        stage stops waiting for it, exactly as if it had dropped out."""
        if client not in self._got:
            self._expected = self._expected - {client}

    # --- receiving ----------------------------------------------------------------------------

    def _check_envelope(self, msg: ClientMessage) -> None:
        if self.stage in (Stage.DONE, Stage.ABORTED):
            raise UnexpectedMessage(f"the session is {self.stage.value}")
        if msg.session_id != self.params.session_id:
            raise SessionMismatch(
                f"{type(msg).__name__} from client {msg.sender} belongs to another session "
                "(replayed or misrouted)"
            )
        if msg.recipient != SERVER:
            raise UnexpectedMessage(f"message from {msg.sender} is addressed to {msg.recipient}")
        if msg.sender not in self._cohort:
            raise UnknownClient(f"client {msg.sender} is not in this session's cohort")
        expected = _EXPECTED_KIND[self.stage]
        if not isinstance(msg, expected):
            raise UnexpectedMessage(
                f"{type(msg).__name__} from client {msg.sender} during stage {self.stage.value}"
            )
        if msg.sender in self._got:
            raise DuplicateClient(
                f"second {type(msg).__name__} from client {msg.sender} in one stage"
            )
        if msg.sender not in self._expected:
            raise UnexpectedMessage(
                f"client {msg.sender} did not complete the previous stage of this session"
            )

    def _on_seed_commit(self, msg: SeedCommit) -> None:
        self._seed_commitments[msg.sender] = msg.commitment

    def _on_advertise(self, msg: AdvertiseKeys) -> None:
        signed = advert_signed_bytes(
            msg.session_id,
            msg.sender,
            msg.encryption_public,
            msg.masking_public,
            msg.context_digest,
            msg.seed_reveal,
        )
        self._roster.verify(msg.sender, msg.signature, signed, "AdvertiseKeys")
        if self.params.is_complete:
            if msg.seed_reveal:
                raise MessageFormatError("a graph-seed reveal in a complete-graph session")
        elif (
            seed_commitment(msg.session_id, msg.sender, msg.seed_reveal)
            != (self._seed_commitments[msg.sender])
        ):
            raise GraphSeedError(
                f"client {msg.sender}'s graph-seed reveal does not open its commitment"
            )
        check_agreement_public_key(msg.encryption_public, f"client {msg.sender}'s encryption key")
        check_agreement_public_key(msg.masking_public, f"client {msg.sender}'s masking key")
        keys = {msg.masking_public, msg.encryption_public}
        reused = [self._key_owner[k] for k in keys if k in self._key_owner]
        if len(keys) != 2 or reused:
            raise DuplicateClient(
                f"client {msg.sender} advertised a public key already used by "
                f"{reused[0] if reused else 'itself'}"
            )
        self._key_owner.update(dict.fromkeys(keys, msg.sender))
        self._adverts[msg.sender] = msg

    def _on_share(self, msg: ShareKeys) -> None:
        expected = set(self._fixed_graph().neighbours(msg.sender)) & self._expected
        recipients = {v for v, _ in msg.ciphertexts}
        if recipients != expected:
            raise MessageFormatError(
                f"client {msg.sender} sent shares to {len(recipients)} clients; expected exactly "
                f"its {len(expected)} neighbours that advertised keys"
            )
        self._shares[msg.sender] = msg

    def _on_masked(self, msg: MaskedInput) -> None:
        if self._sum is None:
            raise UnexpectedMessage("the session holds no running sum")
        try:
            # Wraps mod 2^32/2^64; reduced at the end. A malformed payload adds nothing.
            self._backend.add_packed(self._sum, msg.payload, self.params.ring)
        except SumBackendFailure as exc:
            self._abort(str(exc))
            raise
        self._masked.append(msg.sender)
        if self._record_masked:
            self.transcript.masked_inputs[msg.sender] = msg.payload

    def _on_signature(self, msg: ConsistencySignature) -> None:
        digest = self._adverts[msg.sender].context_digest
        signed = consistency_signed_bytes(msg.session_id, digest, self._u3)
        self._roster.verify(msg.sender, msg.signature, signed, "ConsistencySignature")
        self._signatures[msg.sender] = msg.signature

    def _on_unmask(self, msg: UnmaskResponse) -> None:
        request = self._requests[msg.sender]
        got_self = tuple(v for v, _ in msg.self_mask_shares)
        got_key = tuple(v for v, _ in msg.key_shares)
        if got_self != request.reveal_self_mask_for or got_key != request.reveal_key_for:
            raise MessageFormatError(
                f"client {msg.sender} answered with shares for other clients than requested"
            )
        self._responses[msg.sender] = msg

    _HANDLERS: ClassVar[dict[type, Callable[[ServerSession, ClientMessage], None]]] = {
        SeedCommit: _on_seed_commit,  # type: ignore[dict-item]
        AdvertiseKeys: _on_advertise,  # type: ignore[dict-item]
        ShareKeys: _on_share,  # type: ignore[dict-item]
        MaskedInput: _on_masked,  # type: ignore[dict-item]
        ConsistencySignature: _on_signature,  # type: ignore[dict-item]
        UnmaskResponse: _on_unmask,  # type: ignore[dict-item]
    }

    # --- closing stages -----------------------------------------------------------------------

    def _advance(
        self, survivors: tuple[int, ...], what: str, next_stage: Stage, floor: int
    ) -> None:
        if len(survivors) < floor:
            raise TooFewSurvivors(
                f"only {len(survivors)} clients {what}; {self._floor_text(floor)}"
            )
        self._expected = frozenset(survivors)
        self._got = set()
        self.stage = next_stage

    def _floor_text(self, floor: int) -> str:
        if floor > self.params.threshold:
            p = self.params
            return (
                f"the release floor is {floor} (Shamir threshold {p.threshold}, survivor-set "
                f"quorum {p.signature_quorum}, DP floor {p.min_survivors or 'none'})"
            )
        return f"the threshold is {floor}"

    # U1 >= U2 >= U3 and U3 are the contributors of the released sum: the release floor applies
    # from the first stage (a smaller U1 can never reach it) and is final once U3 is fixed.
    # Signers and unmask responders only need to hold t shares.

    def _fixed_graph(self) -> NeighbourGraph:
        if self._graph is None:
            raise UnexpectedMessage("the SecAgg+ graph seed is not fixed yet")
        return self._graph

    def _close_seed_commit(self) -> list[ServerMessage]:
        u0 = tuple(sorted(self._seed_commitments))
        self._advance(
            u0, "committed to the graph seed", Stage.ADVERTISE_KEYS, self.params.min_release
        )
        commitments = tuple((u, self._seed_commitments[u]) for u in u0)
        self.transcript.seed_commitments = commitments
        return [SeedCommitments(self.params.session_id, u, commitments) for u in u0]

    def _close_advertise(self) -> list[ServerMessage]:
        u1 = tuple(sorted(self._adverts))
        reveals: tuple[tuple[int, bytes], ...] = ()
        if not self.params.is_complete:
            silent = sorted(set(self._seed_commitments) - set(u1))
            if silent:
                raise GraphSeedError(
                    f"clients {silent[:10]} committed to the graph seed but did not reveal; the "
                    "seed needs every committed reveal (choosing among them would let the server "
                    "grind the graph), so this session ends and is rerun under a new one"
                )
            reveals = tuple((u, self._adverts[u].seed_reveal) for u in u1)
            seed = graph_seed(self.params.session_id, reveals)
            self._graph = self.params.graph(seed)
            self.transcript.graph_seed = seed
            self.transcript.seed_reveals = reveals
        self._advance(u1, "advertised keys", Stage.SHARE_KEYS, self.params.min_release)
        graph = self._fixed_graph()
        out: list[ServerMessage] = []
        for u in u1:
            adverts = tuple(
                PeerAdvert(
                    v,
                    self._adverts[v].encryption_public,
                    self._adverts[v].masking_public,
                    self._adverts[v].context_digest,
                    self._adverts[v].signature,
                )
                for v in graph.neighbours(u)
                if v in self._adverts
            )
            out.append(KeysBroadcast(self.params.session_id, u, adverts, reveals))
        return out

    def _close_share(self) -> list[ServerMessage]:
        u2 = tuple(sorted(self._shares))
        self._advance(u2, "shared their keys", Stage.MASKED_INPUT, self.params.min_release)
        inbox: dict[int, list[tuple[int, bytes]]] = {u: [] for u in u2}
        for v in u2:
            for u, ciphertext in self._shares[v].ciphertexts:
                if u in inbox:
                    inbox[u].append((v, ciphertext))
        return [SharesDelivery(self.params.session_id, u, tuple(inbox[u])) for u in u2]

    def _close_masked(self) -> list[ServerMessage]:
        self._u3 = tuple(sorted(self._masked))
        self._advance(
            self._u3, "sent a masked input", Stage.CONSISTENCY_CHECK, self.params.min_release
        )
        return [ConsistencyRequest(self.params.session_id, u, self._u3) for u in self._u3]

    def _close_consistency(self) -> list[ServerMessage]:
        u4 = tuple(sorted(self._signatures))
        quorum = self.params.signature_quorum
        self._advance(u4, "signed the survivor set", Stage.UNMASK, quorum)
        # Every client checks the same quorum of signatures over (session digest, U3): the
        # first `quorum` signers by id, wherever they sit in the graph.
        attestation = tuple((v, self._signatures[v]) for v in u4[:quorum])
        u2, u3 = set(self._shares), set(self._u3)
        graph = self._fixed_graph()
        out: list[ServerMessage] = []
        for u in u4:
            neighbours = graph.neighbours(u)
            request = UnmaskRequest(
                self.params.session_id,
                u,
                self._u3,
                attestation,
                tuple(sorted({u, *neighbours} & u3)),
                tuple(v for v in neighbours if v in u2 and v not in u3),
            )
            self._requests[u] = request
            self.transcript.share_requests.append(
                ShareRequestRecord(
                    self.params.session_id,
                    u,
                    request.reveal_self_mask_for,
                    request.reveal_key_for,
                )
            )
            out.append(request)
        return out

    def _close_unmask(self) -> list[ServerMessage]:
        sid, ring = self.params.session_id, self.params.ring
        if len(self._responses) < self.params.threshold:
            raise TooFewSurvivors(
                f"only {len(self._responses)} clients answered the unmask request; "
                f"the threshold is {self.params.threshold}"
            )
        shares = self._index_shares()
        u3 = set(self._u3)
        graph = self._fixed_graph()
        jobs: list[UnmaskJob] = [
            SelfMaskJob(
                sid,
                u,
                tuple(shares["self"].get(u, {}).items()),
                self.params.threshold,
                self._shares[u].self_mask_commitment,
            )
            for u in self._u3
        ]
        jobs += [
            DroppedKeyJob(
                sid,
                v,
                tuple(shares["key"].get(v, {}).items()),
                self.params.threshold,
                self._adverts[v].masking_public,
                tuple((u, self._adverts[u].masking_public) for u in graph.neighbours(v) if u in u3),
            )
            for v in sorted(set(self._shares) - u3)
        ]
        add_keys: list[bytes] = []
        subtract_keys: list[bytes] = []
        for added, subtracted in self._backend.map(unmask_keys, jobs):
            add_keys += added
            subtract_keys += subtracted
        if self._sum is None:
            raise UnexpectedMessage("the session holds no running sum")
        total = ring.reduce(self._sum)
        self.masks_removed = len(add_keys) + len(subtract_keys)
        self._backend.remove_masks(total, ring, add_keys, subtract_keys)
        ring.reduce(total)
        self._result = AggregateResult(total, self._u3)
        self._sum = None
        self.transcript.releases.append(ReleaseRecord(sid, self._u3, self.params.min_release))
        self.stage = Stage.DONE
        self._expected = frozenset()
        return []

    def _index_shares(self) -> dict[str, dict[int, dict[int, bytes]]]:
        index: dict[str, dict[int, dict[int, bytes]]] = {"self": {}, "key": {}}
        for w, response in self._responses.items():
            for v, share in response.self_mask_shares:
                index["self"].setdefault(v, {})[w] = share
            for v, share in response.key_shares:
                index["key"].setdefault(v, {})[w] = share
        return index

    def _abort(self, reason: str) -> None:
        if self._sum is not None:
            self._sum.fill(0)
        self._sum = None
        self._result = None
        self._responses = {}
        self.stage = Stage.ABORTED
        self.abort_reason = reason
        self._expected = frozenset()

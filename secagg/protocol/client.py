"""The client side of one secure-aggregation session, as a pure state machine.

``start()`` gives the first message (SecAgg+: the graph-seed commitment; classic SecAgg: the
key advert); ``handle(server_message)`` gives the reply for each later stage. Nothing here does
I/O, so the same object runs in the in-process simulation and behind the gRPC transport.

Fail closed: every check that fails raises a specific :class:`ProtocolAbort` subclass (any other
failure while handling a message becomes :class:`SessionFailure`), after which the session is
aborted for good — every secret it held (input, masking key, self-mask seed, share-decryption
key, the shares it holds) is dropped and every further call raises — so an abort never releases
anything. The checks against an active server:

* before signing a survivor set U3 (:meth:`_consistency`): the client itself is in U3, every
  neighbour in U3 is one whose shares it received (it masked with exactly those), and it keeps
  at least t - 1 surviving neighbours — otherwise the server could unmask its input alone
  (isolation: hide honest neighbours' shares from it, or call them dropped);
* before revealing anything (:meth:`_unmask`): the survivor set is the one it signed and at least
  ``signature_quorum`` cohort members in U3 signed the same (session digest, U3), so no other
  survivor set can be attested to any honest client; then, per neighbour, *either* the share of
  its self-mask seed (in U3) *or* of its masking key (not in U3), never both, once per session.

A client whose process does not outlive one message (a Flower ``ClientApp`` runs each message in
whichever worker is free and keeps a node's state in its ``Context``) carries the session across
messages with :meth:`ClientSession.export_state` and :meth:`ClientSession.from_state`: the whole
state, secrets included, in one versioned encoding that is checked as strictly as a message.
Those bytes must stay with the client (they hold its masking and share-decryption keys, its
self-mask seed, the shares it holds and, before the masked input, its plaintext input).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from secagg import aead, shamir
from secagg.errors import (
    ConfigurationError,
    ConsistencyError,
    DuplicateClient,
    GraphSeedError,
    InconsistentSharesError,
    MessageFormatError,
    ProtocolAbort,
    SessionFailure,
    SessionMismatch,
    ShareRequestRefused,
    SurvivorSetRefused,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
)
from secagg.keys import AgreementKeyPair, Identity, KeyPurpose, Roster, derive_pair_key, random_seed
from secagg.messages import (
    SERVER,
    AdvertiseKeys,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    SeedCommit,
    SeedCommitments,
    ServerMessage,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
    _Reader,
    _Writer,
)
from secagg.packing import pack, unpack
from secagg.prg import accumulate_masks
from secagg.protocol.common import (
    SEED_REVEAL_BYTES,
    ClientPolicy,
    RoundParams,
    Stage,
    advert_signed_bytes,
    commitments_digest,
    consistency_signed_bytes,
    context_digest,
    graph_seed,
    seed_commitment,
    self_mask_commitment,
    self_mask_key,
    session_digest,
)
from secagg.ring import RingArray


@dataclass
class _Peer:
    encryption_public: bytes
    masking_public: bytes
    share_key: bytes = b""  # AEAD key for shares exchanged with this peer
    mask_share: bytes = b""  # our share of this peer's s^SK
    seed_share: bytes = b""  # our share of this peer's b


class ClientSession:
    """One client's run of one session.

    ``mask_seconds`` is the time spent building y_u (copy + all masks), ``mask_count`` the
    number of masks added (self mask + one per neighbour that shared), ``pack_seconds`` the
    time to bit-pack y_u for transport; benchmarks compare the first with raw AES-CTR.
    """

    def __init__(
        self,
        client_id: int,
        identity: Identity,
        roster: Roster,
        params: RoundParams,
        input_vector: RingArray,
        context: bytes = b"",
        policy: ClientPolicy | None = None,
    ) -> None:
        (policy or ClientPolicy()).check(params)
        if client_id not in params.cohort:
            raise UnknownClient(f"client {client_id} is not in this session's cohort")
        params.ring.check(input_vector, "input vector")
        if input_vector.size != params.dim:
            raise ConfigurationError(
                f"input has {input_vector.size} elements, round expects {params.dim}"
            )
        self.client_id = client_id
        self.params = params
        self._identity = identity
        self._roster = roster
        self._input: RingArray | None = input_vector
        self._digest = context_digest(params, context)
        self._neighbours: frozenset[int] = frozenset()
        if params.is_complete:
            self._neighbours = frozenset(params.graph(None).neighbours(client_id))
        self._encryption: AgreementKeyPair | None = AgreementKeyPair.generate()
        self._masking: AgreementKeyPair | None = AgreementKeyPair.generate()
        self._seed: bytes | None = random_seed(32)
        self._seed_reveal = b"" if params.is_complete else random_seed(SEED_REVEAL_BYTES)
        self._seed_commitments: tuple[tuple[int, bytes], ...] = ()
        self._peers: dict[int, _Peer] = {}
        self._own_seed_share = b""
        self._delivered: tuple[int, ...] = ()
        self._survivors: tuple[int, ...] = ()
        self.stage = params.stages[0]
        self.graph_seed: bytes | None = None
        self.mask_seconds = 0.0
        self.mask_count = 0
        self.pack_seconds = 0.0
        self.abort_reason: str | None = None

    # --- public API ---------------------------------------------------------------------------

    def start(self) -> SeedCommit | AdvertiseKeys:
        """The first message: the graph-seed commitment (SecAgg+) or the key advert."""
        if self.params.is_complete:
            self._expect(Stage.ADVERTISE_KEYS)
            return self._advertise()
        self._expect(Stage.SEED_COMMIT)
        self.stage = Stage.ADVERTISE_KEYS
        sid = self.params.session_id
        return SeedCommit(
            sid, self.client_id, seed_commitment(sid, self.client_id, self._seed_reveal)
        )

    def handle(self, message: ServerMessage) -> ClientMessage:
        """Process one server message and return the reply; raises and aborts on any violation."""
        if self.stage is Stage.ABORTED:
            raise ProtocolAbort(f"client {self.client_id}: session already aborted")
        try:
            entry = self._HANDLERS.get(type(message))
            if entry is None:
                raise UnexpectedMessage(
                    f"{type(message).__name__} is not a message a server sends to a client"
                )
            expected_stage, handler = entry
            if self.stage is not expected_stage:
                raise UnexpectedMessage(
                    f"{type(message).__name__} arrived while client is at stage {self.stage.value}"
                )
            self._check_envelope(message)
            return handler(self, message)
        except ProtocolAbort as exc:
            self._abort(str(exc))
            raise
        except Exception as exc:  # fail closed: any other failure ends the session too
            failure = SessionFailure(
                f"client {self.client_id}: {type(exc).__name__} while handling "
                f"{type(message).__name__}: {exc}"
            )
            self._abort(str(failure))
            raise failure from exc

    @property
    def aborted(self) -> bool:
        return self.stage is Stage.ABORTED

    def export_state(self) -> bytes:
        """The whole session as bytes, secrets included, for :meth:`from_state` (see the module
        docstring); an aborted or finished session exports no secret (they are already gone)."""
        w = _Writer()
        w.parts.append(_STATE_HEAD.pack(_STATE_MAGIC, _STATE_VERSION))
        p = self.params
        w.fixed(p.session_id, 32, "session id")
        for value, what in (
            (p.ring_bits, "ring bits"),
            (p.dim, "dim"),
            (p.threshold, "threshold"),
            (p.neighbours or 0, "neighbours"),
            (p.quorum, "quorum"),
            (p.min_survivors, "min survivors"),
            (self.client_id, "client id"),
            (_STAGE_CODES.index(self.stage), "stage"),
        ):
            w.u32(value, what)
        w.ids(p.cohort, "cohort")
        w.blob(b"" if self._input is None else pack(self._input, p.ring), "input")
        for key, what in ((self._encryption, "encryption key"), (self._masking, "masking key")):
            w.blob(b"" if key is None else key.private_bytes(), what)
        for blob, what in (
            (self._seed or b"", "self-mask seed"),
            (self._seed_reveal, "graph-seed reveal"),
            (self._digest, "session digest"),
            (self.graph_seed or b"", "graph seed"),
            (self._own_seed_share, "own seed share"),
            ((self.abort_reason or "").encode(), "abort reason"),
        ):
            w.blob(blob, what)
        w.ids(tuple(sorted(self._neighbours)), "neighbours")
        w.id_blobs(self._seed_commitments, "seed commitments")
        peers = tuple(
            (v, b"".join(_lp32(x) for x in (q.encryption_public, q.masking_public, q.share_key,
                                             q.mask_share, q.seed_share)))
            for v, q in sorted(self._peers.items())
        )  # fmt: skip
        w.id_blobs(peers, "peers")
        w.ids(self._delivered, "delivered")
        w.ids(self._survivors, "survivors")
        return b"".join(w.parts)

    @classmethod
    def from_state(
        cls,
        state: bytes,
        identity: Identity,
        roster: Roster,
        policy: ClientPolicy | None = None,
    ) -> ClientSession:
        """The session :meth:`export_state` wrote. The parameters are checked against
        ``policy`` again; bytes that do not decode strictly are :class:`MessageFormatError`."""
        r = _Reader(state, 0)
        magic, version = _STATE_HEAD.unpack(r.fixed(_STATE_HEAD.size, "state header"))
        if magic != _STATE_MAGIC or version != _STATE_VERSION:
            raise MessageFormatError("not a client-session state of a version this code reads")
        sid = r.fixed(32, "session id")
        ring_bits, dim, threshold, k, quorum, floor, client_id, stage = (
            r.u32(what) for what in ("ring", "dim", "t", "k", "quorum", "floor", "id", "stage")
        )
        cohort = r.ids("cohort")
        if stage >= len(_STAGE_CODES):
            raise MessageFormatError(f"unknown stage code {stage} in a client-session state")
        params = RoundParams(sid, ring_bits, dim, threshold, cohort, k or None, quorum, floor)
        (policy or ClientPolicy()).check(params)
        if client_id not in params.cohort:
            raise UnknownClient(f"client {client_id} is not in this session's cohort")
        session = cls.__new__(cls)
        session.client_id = client_id
        session.params = params
        session._identity = identity
        session._roster = roster
        packed = r.blob("input")
        session._input = unpack(packed, params.ring, dim) if packed else None
        enc, mask = r.blob("encryption key"), r.blob("masking key")
        session._encryption = AgreementKeyPair.from_private_bytes(enc) if enc else None
        session._masking = AgreementKeyPair.from_private_bytes(mask) if mask else None
        session._seed = r.blob("self-mask seed") or None
        session._seed_reveal = r.blob("graph-seed reveal")
        session._digest = r.blob("session digest")
        session.graph_seed = r.blob("graph seed") or None
        session._own_seed_share = r.blob("own seed share")
        session.abort_reason = r.blob("abort reason").decode() or None
        session._neighbours = frozenset(r.ids("neighbours"))
        session._seed_commitments = r.id_blobs("seed commitments")
        session._peers = {v: _peer_from(blob) for v, blob in r.id_blobs("peers")}
        session._delivered = r.ids("delivered")
        session._survivors = r.ids("survivors")
        r.end()
        session.stage = _STAGE_CODES[stage]
        session.mask_seconds = 0.0
        session.mask_count = 0
        session.pack_seconds = 0.0
        return session

    # --- stages -------------------------------------------------------------------------------

    def _seed_list(self, msg: SeedCommitments) -> AdvertiseKeys:
        """SecAgg+: check our commitment is in the list, fold the list into the session digest
        (every advert and survivor-set signature covers it), then reveal in the advert."""
        sid = self.params.session_id
        listed = dict(msg.commitments)
        mine = seed_commitment(sid, self.client_id, self._seed_reveal)
        if listed.get(self.client_id) != mine:
            raise GraphSeedError(
                "the list of graph-seed commitments omits or alters ours: the server could "
                "choose the neighbour graph"
            )
        outside = sorted(set(listed) - set(self.params.cohort))
        if outside:
            raise UnknownClient(
                f"graph-seed commitments from clients outside the cohort: {outside}"
            )
        if len(listed) < self.params.min_release:
            raise TooFewSurvivors(
                f"only {len(listed)} clients committed to the graph seed; a release needs "
                f"{self.params.min_release}"
            )
        self._seed_commitments = msg.commitments
        self._digest = session_digest(self._digest, commitments_digest(sid, msg.commitments))
        return self._advertise()

    def _advertise(self) -> AdvertiseKeys:
        enc_pk = self._encryption_pair().public_bytes
        mask_pk = self._masking_pair().public_bytes
        sid = self.params.session_id
        signed = advert_signed_bytes(
            sid, self.client_id, enc_pk, mask_pk, self._digest, self._seed_reveal
        )
        self.stage = Stage.SHARE_KEYS
        return AdvertiseKeys(
            sid,
            self.client_id,
            enc_pk,
            mask_pk,
            self._digest,
            self._identity.sign(signed),
            self._seed_reveal,
        )

    def _fix_graph(self, msg: KeysBroadcast) -> None:
        """SecAgg+: every committed client revealed, each reveal opens its commitment; the seed
        is the hash of all of them, so it is uniform as long as our own reveal is."""
        sid = self.params.session_id
        committed = dict(self._seed_commitments)
        revealed = dict(msg.seed_reveals)
        if set(revealed) != set(committed):
            missing = sorted(set(committed) - set(revealed))
            extra = sorted(set(revealed) - set(committed))
            raise GraphSeedError(
                f"graph-seed reveals do not match the commitments (missing {missing[:10]}, "
                f"uncommitted {extra[:10]})"
            )
        if revealed[self.client_id] != self._seed_reveal:
            raise GraphSeedError("the server altered our graph-seed reveal")
        wrong = [v for v, r in msg.seed_reveals if seed_commitment(sid, v, r) != committed[v]]
        if wrong:
            raise GraphSeedError(
                f"graph-seed reveals of {wrong[:10]} do not open their commitments"
            )
        self.graph_seed = graph_seed(sid, msg.seed_reveals)
        self._neighbours = frozenset(self.params.graph(self.graph_seed).neighbours(self.client_id))
        # Checked, and folded into the session digest at _seed_list: the n commitments are not
        # needed again, and dropping them keeps the exported state of the later stages small.
        self._seed_commitments = ()

    def _share_keys(self, msg: KeysBroadcast) -> ShareKeys:
        sid = self.params.session_id
        if self.params.is_complete:
            if msg.seed_reveals:
                raise UnexpectedMessage("graph-seed reveals in a complete-graph session")
        else:
            self._fix_graph(msg)
        seed_reveals = dict(msg.seed_reveals)
        for advert in msg.adverts:
            v = advert.client_id
            if v not in self._neighbours:
                raise UnknownClient(f"server forwarded keys of client {v}, not a neighbour")
            if advert.context_digest != self._digest:
                raise ConsistencyError(
                    f"client {v} was given a different global model, round config or list of "
                    "graph-seed commitments (session digests differ): the server is inconsistent"
                )
            self._roster.verify(
                v,
                advert.signature,
                advert_signed_bytes(
                    sid,
                    v,
                    advert.encryption_public,
                    advert.masking_public,
                    advert.context_digest,
                    seed_reveals.get(v, b""),
                ),
                "AdvertiseKeys",
            )
        keys = {a.masking_public for a in msg.adverts} | {a.encryption_public for a in msg.adverts}
        if len(keys) != 2 * len(msg.adverts):
            raise DuplicateClient("two neighbours advertised the same public key")
        self._require(len(msg.adverts) + 1, "parties (neighbours that advertised keys and us)")
        encryption = self._encryption_pair()
        peers = {}
        for advert in msg.adverts:
            shared = encryption.exchange(advert.encryption_public)
            key = derive_pair_key(
                shared, sid, KeyPurpose.SHARE_ENCRYPTION, self.client_id, advert.client_id, 32
            )
            peers[advert.client_id] = _Peer(advert.encryption_public, advert.masking_public, key)
        self._peers = peers
        # Shares go to the neighbours and to ourselves: our own share of b_u lets the server
        # reconstruct our self mask with one fewer neighbour, so a round survives n - t dropouts.
        ids = sorted([*peers, self.client_id])
        seed = self._seed_value()
        mask_shares, seed_shares = shamir.split(
            [self._masking_pair().private_bytes(), seed], self.params.threshold, ids
        )
        ciphertexts = tuple(
            (v, aead.seal(peers[v].share_key, ms + ss, sid, self.client_id, v))
            for v, ms, ss in zip(ids, mask_shares, seed_shares, strict=True)
            if v != self.client_id
        )
        self._own_seed_share = seed_shares[ids.index(self.client_id)]
        self.stage = Stage.MASKED_INPUT
        return ShareKeys(
            sid, self.client_id, self_mask_commitment(sid, self.client_id, seed), ciphertexts
        )

    def _masked_input(self, msg: SharesDelivery) -> MaskedInput:
        sid = self.params.session_id
        for v, ciphertext in msg.ciphertexts:
            peer = self._peers.get(v)
            if peer is None:
                raise UnknownClient(f"shares from client {v}, who did not advertise to us")
            plaintext = aead.open_sealed(peer.share_key, ciphertext, sid, v, self.client_id)
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                raise InconsistentSharesError(f"client {v} sent shares of the wrong length")
            peer.mask_share = plaintext[: shamir.SHARE_BYTES]
            peer.seed_share = plaintext[shamir.SHARE_BYTES :]
        self._delivered = tuple(v for v, _ in msg.ciphertexts)
        self._require(len(self._delivered) + 1, "parties (neighbours that shared and us)")
        masking = self._masking_pair()
        add_keys = [self_mask_key(sid, self.client_id, self._seed_value())]
        subtract_keys: list[bytes] = []
        for v in self._delivered:
            shared = masking.exchange(self._peers[v].masking_public)
            key = derive_pair_key(shared, sid, KeyPurpose.MASK, self.client_id, v, 16)
            (add_keys if v > self.client_id else subtract_keys).append(key)
        if self._input is None:
            raise ProtocolAbort("input already consumed")
        begin = time.perf_counter()
        masked = self._input.copy()
        accumulate_masks(masked, self.params.ring, add_keys, subtract_keys)
        self.mask_seconds = time.perf_counter() - begin
        self.mask_count = len(add_keys) + len(subtract_keys)
        begin = time.perf_counter()
        payload = pack(masked, self.params.ring)
        self.pack_seconds = time.perf_counter() - begin
        self._input = None  # the plaintext is no longer needed; keep nothing we need not keep
        self.stage = Stage.CONSISTENCY_CHECK
        return MaskedInput(sid, self.client_id, payload)

    def _consistency(self, msg: ConsistencyRequest) -> ConsistencySignature:
        self._check_survivors(msg.survivors)
        self._survivors = msg.survivors
        signed = consistency_signed_bytes(self.params.session_id, self._digest, msg.survivors)
        self.stage = Stage.UNMASK
        return ConsistencySignature(
            self.params.session_id, self.client_id, self._identity.sign(signed)
        )

    def _unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        if msg.survivors != self._survivors:
            raise ConsistencyError(
                "the unmask request names a different survivor set than was signed"
            )
        signed = consistency_signed_bytes(self.params.session_id, self._digest, self._survivors)
        survivors = frozenset(self._survivors)
        signers = set()
        for v, signature in msg.signatures:
            if v not in survivors:
                raise UnknownClient(f"consistency signature from client {v}, not a survivor")
            self._roster.verify(v, signature, signed, "ConsistencySignature")
            signers.add(v)
        if len(signers) < self.params.signature_quorum:
            raise ConsistencyError(
                f"only {len(signers)} survivors attest to the survivor set, "
                f"{self.params.signature_quorum} needed"
            )
        self_for, key_for = set(msg.reveal_self_mask_for), set(msg.reveal_key_for)
        both = self_for & key_for
        if both:
            raise ShareRequestRefused(
                f"server asked for both the self-mask share and the key share of {sorted(both)}"
            )
        if not self_for <= survivors:
            raise ShareRequestRefused(
                f"self-mask shares requested for {sorted(self_for - survivors)}, "
                "outside the consistency-checked survivor set"
            )
        if key_for & survivors:
            raise ShareRequestRefused(
                f"key shares requested for {sorted(key_for & survivors)}, who are in the "
                "signed survivor set (their masked input was received)"
            )
        delivered = set(self._delivered)
        unknown = (self_for - {self.client_id} | key_for) - delivered
        if unknown:
            raise ShareRequestRefused(f"no shares held for {sorted(unknown)}")
        response = UnmaskResponse(
            self.params.session_id,
            self.client_id,
            tuple((v, self._seed_share_of(v)) for v in sorted(self_for)),
            tuple((v, self._peers[v].mask_share) for v in sorted(key_for)),
        )
        self._forget()
        self.stage = Stage.DONE  # one answer per session: a second request is refused
        return response

    _HANDLERS: ClassVar[dict[type, tuple[Stage, Callable[..., ClientMessage]]]] = {
        SeedCommitments: (Stage.ADVERTISE_KEYS, _seed_list),
        KeysBroadcast: (Stage.SHARE_KEYS, _share_keys),
        SharesDelivery: (Stage.MASKED_INPUT, _masked_input),
        ConsistencyRequest: (Stage.CONSISTENCY_CHECK, _consistency),
        UnmaskRequest: (Stage.UNMASK, _unmask),
    }

    # --- helpers ------------------------------------------------------------------------------

    def _check_envelope(self, msg: ServerMessage) -> None:
        if msg.session_id != self.params.session_id:
            raise SessionMismatch(
                f"{type(msg).__name__} belongs to another session (replayed or misrouted)"
            )
        if msg.sender != SERVER or msg.recipient != self.client_id:
            raise UnexpectedMessage(
                f"{type(msg).__name__} addressed from {msg.sender} to {msg.recipient}, "
                f"expected server to {self.client_id}"
            )

    def _check_survivors(self, survivors: tuple[int, ...]) -> None:
        """The checks before signing U3 (the round-3 check of Bonawitz et al., with SecAgg+
        neighbourhoods): see the module docstring."""
        cohort = set(self.params.cohort)
        outside = [v for v in survivors if v not in cohort]
        if outside:
            raise UnknownClient(f"survivor set names clients outside the cohort: {outside}")
        floor = self.params.min_release
        if len(survivors) < floor:
            why = (
                f"the release floor {floor} (threshold {self.params.threshold}, "
                f"quorum {self.params.signature_quorum}, DP floor {self.params.min_survivors})"
            )
            raise TooFewSurvivors(f"{len(survivors)} survivors, fewer than {why}")
        u3 = frozenset(survivors)
        if self.client_id not in u3:
            raise SurvivorSetRefused(
                "the survivor set omits us although we sent a masked input: signing it would "
                "let the server reconstruct our masking key and our self mask from two groups"
            )
        not_delivered = sorted((u3 & self._neighbours) - set(self._delivered))
        if not_delivered:
            raise SurvivorSetRefused(
                f"the survivor set names neighbours {not_delivered[:10]} whose shares never "
                "reached us, so our input is not masked with theirs (isolation attempt)"
            )
        surviving_neighbours = len(u3 & self._neighbours)
        if surviving_neighbours + 1 < self.params.threshold:
            raise SurvivorSetRefused(
                f"only {surviving_neighbours} of our neighbours survive; the threshold "
                f"{self.params.threshold} needs {self.params.threshold - 1}"
            )

    def _seed_share_of(self, v: int) -> bytes:
        return self._own_seed_share if v == self.client_id else self._peers[v].seed_share

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise TooFewSurvivors(f"only {count} {what}; threshold is {self.params.threshold}")

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise UnexpectedMessage(f"client is at stage {self.stage.value}, not {stage.value}")

    def _masking_pair(self) -> AgreementKeyPair:
        if self._masking is None:
            raise ProtocolAbort("masking key already erased")
        return self._masking

    def _encryption_pair(self) -> AgreementKeyPair:
        if self._encryption is None:
            raise ProtocolAbort("share-decryption key already erased")
        return self._encryption

    def _seed_value(self) -> bytes:
        if self._seed is None:
            raise ProtocolAbort("self-mask seed already erased")
        return self._seed

    def _forget(self) -> None:
        """Drop every secret: with the share-decryption key gone, the share ciphertexts the
        server stored no longer open, so erased shares stay erased."""
        self._input = None
        self._masking = None
        self._encryption = None
        self._seed = None
        self._own_seed_share = b""
        self._peers = {}

    def _abort(self, reason: str) -> None:
        self._forget()
        self.stage = Stage.ABORTED
        self.abort_reason = reason


_STATE_MAGIC = b"FSS"
_STATE_VERSION = 1
_STATE_HEAD = struct.Struct(">3sB")
_STAGE_CODES = tuple(Stage)


def _lp32(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _peer_from(blob: bytes) -> _Peer:
    """Inverse of the peer encoding in :meth:`ClientSession.export_state`."""
    fields: list[bytes] = []
    offset = 0
    for _ in range(5):
        if offset + 4 > len(blob):
            raise MessageFormatError("client-session state: peer record truncated")
        (size,) = struct.unpack_from(">I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise MessageFormatError("client-session state: peer record truncated")
        fields.append(blob[offset : offset + size])
        offset += size
    if offset != len(blob):
        raise MessageFormatError("client-session state: trailing bytes in a peer record")
    return _Peer(*fields)

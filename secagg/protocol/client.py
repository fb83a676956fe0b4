"""The client side of one secure-aggregation session, as a pure state machine.

``start()`` gives the AdvertiseKeys message; ``handle(server_message)`` gives the reply for each
later stage. Nothing here does I/O, so the same object runs in the in-process simulation and
behind the gRPC transport.

Fail closed: every check that fails raises a specific :class:`ProtocolAbort` subclass, after
which the session is aborted for good — its secrets are dropped and every further call raises —
so an abort never releases anything. The checks that matter most are in :meth:`_unmask`: the
server may learn, for each neighbour v, *either* the share of v's self-mask seed (if v's masked
input is in the signed survivor set U3) *or* the share of v's masking key (if v dropped after
sharing), never both, and the client answers one unmask request per session only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from secagg import aead, shamir
from secagg.errors import (
    ConfigurationError,
    ConsistencyError,
    DuplicateClient,
    InconsistentSharesError,
    ProtocolAbort,
    SessionMismatch,
    ShareRequestRefused,
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
    ServerMessage,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.packing import pack
from secagg.prg import accumulate_masks
from secagg.protocol.common import (
    ClientPolicy,
    RoundParams,
    Stage,
    advert_signed_bytes,
    consistency_signed_bytes,
    context_digest,
    self_mask_commitment,
    self_mask_key,
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
        self._neighbours = frozenset(params.graph.neighbours(client_id))
        self._encryption = AgreementKeyPair.generate()
        self._masking: AgreementKeyPair | None = AgreementKeyPair.generate()
        self._seed: bytes | None = random_seed(32)
        self._peers: dict[int, _Peer] = {}
        self._own_seed_share = b""
        self._delivered: tuple[int, ...] = ()
        self._survivors: tuple[int, ...] = ()
        self.stage = Stage.ADVERTISE_KEYS
        self.mask_seconds = 0.0
        self.mask_count = 0
        self.pack_seconds = 0.0
        self.abort_reason: str | None = None

    # --- public API ---------------------------------------------------------------------------

    def start(self) -> AdvertiseKeys:
        self._expect(Stage.ADVERTISE_KEYS)
        enc_pk = self._encryption.public_bytes
        mask_pk = self._masking_pair().public_bytes
        signed = advert_signed_bytes(
            self.params.session_id, self.client_id, enc_pk, mask_pk, self._digest
        )
        self.stage = Stage.SHARE_KEYS
        return AdvertiseKeys(
            self.params.session_id,
            self.client_id,
            enc_pk,
            mask_pk,
            self._digest,
            self._identity.sign(signed),
        )

    def handle(self, message: ServerMessage) -> ClientMessage:
        """Process one server message and return the reply; raises and aborts on any violation."""
        if self.stage is Stage.ABORTED:
            raise ProtocolAbort(f"client {self.client_id}: session already aborted")
        handlers: dict[type, tuple[Stage, Callable[..., ClientMessage]]] = {
            KeysBroadcast: (Stage.SHARE_KEYS, self._share_keys),
            SharesDelivery: (Stage.MASKED_INPUT, self._masked_input),
            ConsistencyRequest: (Stage.CONSISTENCY_CHECK, self._consistency),
            UnmaskRequest: (Stage.UNMASK, self._unmask),
        }
        try:
            expected_stage, handler = handlers[type(message)]
            if self.stage is not expected_stage:
                raise UnexpectedMessage(
                    f"{type(message).__name__} arrived while client is at stage {self.stage.value}"
                )
            self._check_envelope(message)
            return handler(message)
        except ProtocolAbort as exc:
            self._abort(str(exc))
            raise

    @property
    def aborted(self) -> bool:
        return self.stage is Stage.ABORTED

    # --- stages -------------------------------------------------------------------------------

    def _share_keys(self, msg: KeysBroadcast) -> ShareKeys:
        sid = self.params.session_id
        for advert in msg.adverts:
            v = advert.client_id
            if v not in self._neighbours:
                raise UnknownClient(f"server forwarded keys of client {v}, not a neighbour")
            self._roster.verify(
                v,
                advert.signature,
                advert_signed_bytes(
                    sid, v, advert.encryption_public, advert.masking_public, advert.context_digest
                ),
                "AdvertiseKeys",
            )
            if advert.context_digest != self._digest:
                raise ConsistencyError(
                    f"client {v} was given a different global model or round config "
                    "(context digests differ): the server is inconsistent"
                )
        keys = {a.masking_public for a in msg.adverts} | {a.encryption_public for a in msg.adverts}
        if len(keys) != 2 * len(msg.adverts):
            raise DuplicateClient("two neighbours advertised the same public key")
        self._require(len(msg.adverts) + 1, "parties (neighbours that advertised keys and us)")
        peers = {}
        for advert in msg.adverts:
            shared = self._encryption.exchange(advert.encryption_public)
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
            if v not in survivors or (v not in self._neighbours and v != self.client_id):
                raise UnknownClient(
                    f"consistency signature from client {v}, not a surviving neighbour"
                )
            self._roster.verify(v, signature, signed, "ConsistencySignature")
            signers.add(v)
        if len(signers) < self.params.threshold:
            raise ConsistencyError(
                f"only {len(signers)} neighbours attest to the survivor set, "
                f"{self.params.threshold} needed"
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
        cohort = set(self.params.cohort)
        outside = [v for v in survivors if v not in cohort]
        if outside:
            raise UnknownClient(f"survivor set names clients outside the cohort: {outside}")
        floor = self.params.min_release
        if len(survivors) < floor:
            why = (
                f"the DP floor {floor} the noise was calibrated for"
                if floor > self.params.threshold
                else f"the threshold {floor}"
            )
            raise TooFewSurvivors(f"{len(survivors)} survivors, fewer than {why}")

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

    def _seed_value(self) -> bytes:
        if self._seed is None:
            raise ProtocolAbort("self-mask seed already erased")
        return self._seed

    def _forget(self) -> None:
        self._input = None
        self._masking = None
        self._seed = None
        self._own_seed_share = b""
        self._peers = {}

    def _abort(self, reason: str) -> None:
        self._forget()
        self.stage = Stage.ABORTED
        self.abort_reason = reason

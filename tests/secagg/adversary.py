"""An active server for the attack tests: it drives honest :class:`ClientSession` objects with
whatever messages it likes and then tries to recover one client's input from what they
released, exactly as a malicious coordinator would (it knows every public value and every
message, nothing a client keeps).

Each attack test asserts on :meth:`ActiveServer.recover`: ``None`` means the released shares
did not give the server both the target's self-mask seed and every pair key it masked with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from secagg import shamir
from secagg.errors import InconsistentSharesError, ProtocolAbort
from secagg.keys import AgreementKeyPair, Identity, KeyPurpose, Roster, derive_pair_key
from secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    PeerAdvert,
    SeedCommit,
    SeedCommitments,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.packing import unpack
from secagg.prg import accumulate_masks
from secagg.protocol import ClientPolicy, ClientSession, RoundParams
from secagg.protocol.common import graph_seed, self_mask_commitment, self_mask_key
from secagg.ring import RingArray
from secagg.simulate import make_identities


@dataclass
class ActiveServer:
    params: RoundParams
    inputs: Mapping[int, RingArray]
    policy: ClientPolicy | None = None
    identities: dict[int, Identity] = field(init=False)
    roster: Roster = field(init=False)
    clients: dict[int, ClientSession] = field(init=False)
    refusals: dict[int, str] = field(default_factory=dict)
    adverts: dict[int, AdvertiseKeys] = field(default_factory=dict)
    shares: dict[int, ShareKeys] = field(default_factory=dict)
    masked: dict[int, MaskedInput] = field(default_factory=dict)
    signatures: dict[int, bytes] = field(default_factory=dict)
    responses: dict[int, UnmaskResponse] = field(default_factory=dict)
    delivered: dict[int, tuple[int, ...]] = field(default_factory=dict)
    seed: bytes | None = None

    def __post_init__(self) -> None:
        self.identities, self.roster = make_identities(self.params.cohort)
        self.clients = {
            u: ClientSession(
                u,
                self.identities[u],
                self.roster,
                self.params,
                self.inputs[u],
                policy=self.policy,
            )
            for u in self.params.cohort
        }

    def _ask(self, u: int, message: object) -> object | None:
        try:
            return self.clients[u].handle(message)  # type: ignore[arg-type]
        except ProtocolAbort as exc:
            self.refusals[u] = f"{type(exc).__name__}: {exc}"
            return None

    # --- honest stages up to the masked inputs, with the deliveries the attack chooses -------

    def advertise(self) -> None:
        sid = self.params.session_id
        first = {u: c.start() for u, c in self.clients.items()}
        if self.params.is_complete:
            self.adverts = {u: m for u, m in first.items() if isinstance(m, AdvertiseKeys)}
            return
        commitments = tuple(
            (u, m.commitment) for u, m in sorted(first.items()) if isinstance(m, SeedCommit)
        )
        for u in self.clients:
            reply = self._ask(u, SeedCommitments(sid, u, commitments))
            if isinstance(reply, AdvertiseKeys):
                self.adverts[u] = reply
        reveals = tuple((u, self.adverts[u].seed_reveal) for u in sorted(self.adverts))
        self.seed = graph_seed(sid, reveals)

    def neighbours(self, u: int) -> tuple[int, ...]:
        return self.params.graph(self.seed).neighbours(u)

    def share_keys(self) -> None:
        sid = self.params.session_id
        reveals = tuple((u, self.adverts[u].seed_reveal) for u in sorted(self.adverts))
        if self.params.is_complete:
            reveals = ()
        for u in self.clients:
            peers = tuple(
                PeerAdvert(v, a.encryption_public, a.masking_public, a.context_digest, a.signature)
                for v, a in sorted(self.adverts.items())
                if v in self.neighbours(u)
            )
            reply = self._ask(u, KeysBroadcast(sid, u, peers, reveals))
            if isinstance(reply, ShareKeys):
                self.shares[u] = reply

    def masked_inputs(self, deliver_from: Callable[[int], Iterable[int]] | None = None) -> None:
        """Deliver to each u the share ciphertexts of ``deliver_from(u)`` (default: all)."""
        sid = self.params.session_id
        for u in self.clients:
            senders = set(self.neighbours(u) if deliver_from is None else deliver_from(u))
            ciphertexts = tuple(
                (v, ct)
                for v in sorted(self.shares)
                if v in senders
                for w, ct in self.shares[v].ciphertexts
                if w == u
            )
            self.delivered[u] = tuple(v for v, _ in ciphertexts)
            reply = self._ask(u, SharesDelivery(sid, u, ciphertexts))
            if isinstance(reply, MaskedInput):
                self.masked[u] = reply

    # --- the dishonest end ---------------------------------------------------------------------

    def collect_signatures(self, views: Mapping[int, tuple[int, ...]]) -> None:
        """Show each client in ``views`` the survivor set given there."""
        sid = self.params.session_id
        for u, survivors in views.items():
            reply = self._ask(u, ConsistencyRequest(sid, u, survivors))
            if isinstance(reply, ConsistencySignature):
                self.signatures[u] = reply.signature

    def request_unmask(
        self, u: int, survivors: tuple[int, ...], self_for: Iterable[int], key_for: Iterable[int]
    ) -> None:
        sid = self.params.session_id
        signatures = tuple(sorted((v, s) for v, s in self.signatures.items() if v in survivors))
        request = UnmaskRequest(
            sid, u, survivors, signatures, tuple(sorted(self_for)), tuple(sorted(key_for))
        )
        reply = self._ask(u, request)
        if isinstance(reply, UnmaskResponse):
            self.responses[u] = reply

    def request_what_each_holds(
        self, survivors: tuple[int, ...], dropped: Iterable[int], recipients: Iterable[int]
    ) -> None:
        """Ask each recipient for exactly the shares it holds: self-mask shares of the survivors
        whose shares reached it (and its own), key shares of the "dropped" ones."""
        gone = set(dropped)
        for u in recipients:
            held = set(self.delivered.get(u, ()))
            mine = {u} if u in survivors else set()
            self.request_unmask(u, survivors, (held & set(survivors)) | mine, held & gone)

    def recover(self, target: int) -> RingArray | None:
        """x_target from y_target, if the released shares give b_target and the masking key of
        every neighbour the target masked with (or the target's own masking key)."""
        sid, t, ring = self.params.session_id, self.params.threshold, self.params.ring
        if target not in self.masked:
            return None
        seed_shares = {
            w: s for w, r in self.responses.items() for v, s in r.self_mask_shares if v == target
        }
        try:
            b = shamir.reconstruct(seed_shares, t, "b") if len(seed_shares) >= t else None
        except InconsistentSharesError:
            b = None
        if b is None or self_mask_commitment(sid, target, b) != (
            self.shares[target].self_mask_commitment
        ):
            return None
        y = unpack(self.masked[target].payload, ring, self.params.dim).copy()
        add: list[bytes] = []
        subtract = [self_mask_key(sid, target, b)]
        own = self._masking_key(target)  # split views: the target's own key from other holders
        for v in self.delivered[target]:  # the neighbours the target masked with
            if own is not None:
                shared = own.exchange(self.adverts[v].masking_public)
            else:
                theirs = self._masking_key(v)
                if theirs is None:
                    return None  # a pair mask the server cannot remove
                shared = theirs.exchange(self.adverts[target].masking_public)
            key = derive_pair_key(shared, sid, KeyPurpose.MASK, target, v, 16)
            (subtract if v > target else add).append(key)
        accumulate_masks(y, ring, add, subtract)
        return ring.reduce(y)

    def _masking_key(self, owner: int) -> AgreementKeyPair | None:
        shares = {w: s for w, r in self.responses.items() for o, s in r.key_shares if o == owner}
        if len(shares) < self.params.threshold:
            return None
        return AgreementKeyPair.from_private_bytes(
            shamir.reconstruct(shares, self.params.threshold, "masking key")
        )


def random_inputs(params: RoundParams, seed: int = 0) -> dict[int, RingArray]:
    rng = np.random.default_rng(seed)
    ring = params.ring
    return {
        u: ring.reduce(rng.integers(0, 2**32, params.dim, dtype=np.uint64).astype(ring.dtype))
        for u in params.cohort
    }

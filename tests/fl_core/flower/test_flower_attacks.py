"""A malicious Flower workflow against fedsec's mod, and the same moves against Flower's SecAgg+.

The server side is Flower's: it chooses every message the ClientApps receive. Each test plays
a server that does what Flower's ``SecAggPlusWorkflow`` protocol lets it do, through the Flower
``Message`` API, and checks that ``FedsecMod`` reveals nothing:

* listing a client both alive and dropped, to get both the share of its self-mask seed and
  the share of its masking key (with both, its masked input opens);
* inventing a neighbour: forwarding a public key the server made itself, unsigned, so that the
  client encrypts its shares to the server.

The ``flower_*`` tests run the same moves against Flower's own ``secaggplus_mod`` and show they
succeed there: that is the behaviour fedsec's mod replaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import pytest

pytest.importorskip("flwr", reason="needs Flower, the optional extra: pip install 'fedsec[flower]'")

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_core.flower.local_grid import LocalGrid
from fl_core.flower.plan import RECORD, STAGE_ABORT, STAGE_SECAGG
from fl_core.flower.workflow import FedsecWorkflow
from secagg.keys import AgreementKeyPair
from secagg.messages import (
    KeysBroadcast,
    PeerAdvert,
    ServerMessage,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    encode_message,
)

from .helpers import FlowerFederation, make_federation

Tamper = Callable[[ServerMessage], ServerMessage]


class MaliciousGrid(LocalGrid):
    """A server that rewrites the secagg messages it sends (through the Flower records) and
    keeps every reply it gets."""

    def __init__(self, fed: FlowerFederation, tamper: Tamper) -> None:
        super().__init__(fed.app, {node: {} for node in fed.nodes})
        self.tamper = tamper
        self.replies: list[tuple[int, str, bytes]] = []  # (client id, stage, payload)
        self.nodes = fed.nodes

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for m in messages:
            record = m.content.config_records[RECORD]
            if record["stage"] == STAGE_SECAGG:
                payload = record["payload"]
                assert isinstance(payload, bytes)
                message = decode_message(payload)
                assert isinstance(message, ServerMessage)
                evil = encode_message(self.tamper(message))
                content = RecordDict({RECORD: ConfigRecord({"stage": STAGE_SECAGG,
                                                            "payload": evil})})  # fmt: skip
                m = Message(content, dst_node_id=m.metadata.dst_node_id, message_type="train")
            out.append(m)
        replies = list(super().send_and_receive(out, timeout=timeout))
        for reply in replies:
            record = reply.content.config_records[RECORD]
            payload = record["payload"]
            assert isinstance(payload, bytes)
            self.replies.append(
                (self.nodes[reply.metadata.src_node_id], str(record["stage"]), payload)
            )
        return replies

    def aborts(self) -> dict[int, str]:
        return {u: p.decode() for u, stage, p in self.replies if stage == STAGE_ABORT}

    def unmask_responses(self) -> list[UnmaskResponse]:
        out = []
        for _, stage, payload in self.replies:
            if stage == STAGE_SECAGG:
                message = decode_message(payload)
                if isinstance(message, UnmaskResponse):
                    out.append(message)
        return out


def _run(fed: FlowerFederation, tamper: Tamper) -> tuple[MaliciousGrid, FedsecWorkflow]:
    grid = MaliciousGrid(fed, tamper)
    workflow = FedsecWorkflow(fed.config, fed.roster, max_samples=100)
    workflow.start(grid, fed.initial())
    return grid, workflow


@pytest.mark.parametrize("both_in_one_request", [True, False])
def test_fedsec_mod_refuses_a_client_listed_alive_and_dropped(both_in_one_request: bool) -> None:
    fed = make_federation(5)
    victim, asked = 5, 1

    def tamper(message: ServerMessage) -> ServerMessage:
        if isinstance(message, UnmaskRequest) and message.recipient == asked:
            alive = message.reveal_self_mask_for
            if not both_in_one_request:
                alive = tuple(v for v in alive if v != victim)
            return dataclasses.replace(
                message, reveal_key_for=(victim,), reveal_self_mask_for=alive
            )
        return message

    grid, _ = _run(fed, tamper)
    assert "ShareRequestRefused" in grid.aborts()[asked]
    assert all(r.sender != asked for r in grid.unmask_responses())
    key_shares_of_victim = [r for r in grid.unmask_responses() if victim in dict(r.key_shares)]
    assert key_shares_of_victim == []


def test_fedsec_mod_refuses_an_invented_neighbour_with_an_unsigned_key() -> None:
    fed = make_federation(4)
    server_key = AgreementKeyPair.generate()  # the server's own key, passed off as client 4's

    def tamper(message: ServerMessage) -> ServerMessage:
        if isinstance(message, KeysBroadcast) and message.recipient == 1:
            adverts = tuple(
                PeerAdvert(a.client_id, server_key.public_bytes, server_key.public_bytes[::-1],
                           a.context_digest, a.signature)
                if a.client_id == 4 else a
                for a in message.adverts
            )  # fmt: skip
            return dataclasses.replace(message, adverts=adverts)
        return message

    grid, _ = _run(fed, tamper)
    assert "InvalidSignatureError" in grid.aborts()[1]
    # Client 1 encrypted nothing to anyone: its only reply after the keys was the refusal.
    assert [stage for u, stage, _ in grid.replies if u == 1][-1] == STAGE_ABORT


def test_fedsec_mod_refuses_a_neighbour_outside_the_cohort() -> None:
    fed = make_federation(4)
    stranger = AgreementKeyPair.generate()

    def tamper(message: ServerMessage) -> ServerMessage:
        if isinstance(message, KeysBroadcast) and message.recipient == 2:
            fake = PeerAdvert(99, stranger.public_bytes, stranger.public_bytes[::-1],
                              message.adverts[0].context_digest, bytes(64))  # fmt: skip
            return dataclasses.replace(message, adverts=(*message.adverts, fake))
        return message

    grid, _ = _run(fed, tamper)
    assert "UnknownClient" in grid.aborts()[2]


# --- the same moves against Flower's own SecAgg+ -----------------------------------------------


def _flower_secaggplus(
    n: int, shares: int | None = None
) -> tuple[dict[int, Context], Callable[..., Message]]:
    """n nodes running Flower's secaggplus_mod through its setup stage; returns the contexts
    and a function that sends one stage's configs to one node."""
    import numpy as np
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat

    contexts = {u: Context(1, u, {}, RecordDict(), {}) for u in range(1, n + 1)}

    def fit(msg: Message, ctxt: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(4, np.float32)]), 5, {})
        return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

    def send(u: int, configs: dict[str, object]) -> Message:
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}),  # type: ignore[arg-type]
                      dst_node_id=u, message_type="train")  # fmt: skip
        return secaggplus_mod(msg, contexts[u], fit)

    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: shares or n,
             Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22,
             Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 1000.0}  # fmt: skip
    send.keys = {}  # type: ignore[attr-defined]
    for u in contexts:
        reply = send(u, dict(setup))
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        send.keys[u] = [record[Key.PUBLIC_KEY_1], record[Key.PUBLIC_KEY_2]]  # type: ignore[attr-defined]
    return contexts, send


def test_flower_secaggplus_mod_gives_both_shares_of_a_client_listed_alive_and_dropped() -> None:
    """The behaviour fedsec's mod replaces: Flower's mod has no disjointness check."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    n = 3
    _, send = _flower_secaggplus(n)
    keys = send.keys  # type: ignore[attr-defined]
    shares: dict[int, tuple[list[int], list[bytes]]] = {}
    for u in range(1, n + 1):
        reply = send(u, {Key.STAGE: Stage.SHARE_KEYS, **{str(v): keys[v] for v in keys}})
        record = reply.content.config_records["secaggplus_configs"]
        shares[u] = (list(record[Key.DESTINATION_LIST]), list(record[Key.CIPHERTEXT_LIST]))
    for u in range(1, n + 1):
        srcs = [v for v in shares if u in shares[v][0]]
        ctxts = [shares[v][1][shares[v][0].index(u)] for v in srcs]
        send(u, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ctxts,
                 Key.SOURCE_LIST: srcs})  # fmt: skip
    victim = 3
    reply = send(1, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, victim],
                     Key.DEAD_NODE_ID_LIST: [victim]})  # fmt: skip
    record = reply.content.config_records["secaggplus_configs"]
    # Both the share of the victim's self-mask seed and of its masking key came back.
    assert list(record[Key.NODE_ID_LIST]).count(victim) == 2


def test_flower_secaggplus_mod_encrypts_its_shares_to_an_invented_neighbour() -> None:
    """The behaviour fedsec's mod replaces: Flower's keys are unsigned."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        generate_key_pairs,
        public_key_to_bytes,
    )

    _, send = _flower_secaggplus(3, shares=4)  # the server sets the share count too
    keys = dict(send.keys)  # type: ignore[attr-defined]
    _, mask_pk = generate_key_pairs()  # the server's own key pairs, passed off as node 99's
    sk, pk = generate_key_pairs()
    keys[99] = [public_key_to_bytes(mask_pk), public_key_to_bytes(pk)]
    reply = send(1, {Key.STAGE: Stage.SHARE_KEYS, **{str(v): keys[v] for v in keys}})
    record = reply.content.config_records["secaggplus_configs"]
    dsts = list(record[Key.DESTINATION_LIST])
    ciphertext = list(record[Key.CIPHERTEXT_LIST])[dsts.index(99)]
    shared = generate_shared_key(sk, bytes_to_public_key(keys[1][1]))
    src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
    assert (src, dst) == (1, 99) and seed_share and key_share  # the server holds node 1's shares

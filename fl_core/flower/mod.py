"""The client side of fedsec inside a Flower ``ClientApp``: ``ClientApp(mods=[FedsecMod()])``.

The mod answers the messages of :class:`fl_core.flower.workflow.FedsecWorkflow` (those that carry
the ``fedsec`` ConfigRecord, see :mod:`fl_core.flower.plan`) and passes every other message to
the app unchanged. Per round:

1. *join*: it signs the workflow's fresh nonce, the run and node id with the institution's
   Ed25519 identity key, so the workflow learns which roster entry answers at which node;
2. *setup*: it decodes the round plan strictly, checks the parameters against the
   institution's :class:`~secagg.protocol.ClientPolicy` (its own (k, t), quorum and ring floors
   — not numbers the server can talk it down from), calls the app's ``@app.train()`` function
   with the global arrays and the plan's training config, turns ``trained - global`` into the
   strategy's contribution, encodes it with the plan's codec (quantisation, or distributed DP),
   and starts a :class:`~secagg.protocol.ClientSession` that binds the exact plan bytes and the
   digest of the model it received;
3. *secagg*: every later message is a canonical secagg message, answered by the session;
4. *end* (only when the server gives up on a round): it erases the session.

The session runs unchanged, so the guarantees are those of fedsec's own transport: roster
signatures on every key advert and survivor set, the consistency check, the isolation checks
and the never-both rule before any share leaves, fail-closed aborts. Nothing but protocol
messages goes back: the app's trained arrays and its metrics (sample count, train loss) stay
on the client — the sample count travels inside the secure sum as the weight. Flower's own
``secaggplus_mod`` forwards both in the clear.

Between messages the session lives in the node's ``Context.state`` (Flower may run each message
in another worker process; ``Context.state`` never leaves the node). An abort replies with the
reason, erases the session there too, and leaves the round; it never raises into Flower, so the
erased state is kept even where Flower drops a context whose app raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fl_core.flower import require_flwr

require_flwr()

import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.app.typing import ConfigRecordValues  # noqa: E402

from fl_core.errors import FLError  # noqa: E402
from fl_core.flower.plan import (  # noqa: E402
    RECORD,
    STAGE_ABORT,
    STAGE_END,
    STAGE_JOIN,
    STAGE_SECAGG,
    STAGE_SETUP,
    STATE,
    FlowerPlanError,
    FlowerRound,
    arrays_digest,
    flatten,
    join_signed_bytes,
    layout_of,
    round_binding,
)
from fl_core.round import client_contribution  # noqa: E402
from fl_core.strategies import build_strategy  # noqa: E402
from fl_core.updates import check_finite  # noqa: E402
from secagg.errors import SecAggError, UnexpectedMessage, UnknownClient  # noqa: E402
from secagg.keys import Identity, Roster  # noqa: E402
from secagg.messages import SERVER_MESSAGE_TYPES, decode_message, encode_message  # noqa: E402
from secagg.protocol import ClientPolicy, ClientSession  # noqa: E402

log = logging.getLogger("fedsec.flower")

#: The ``node_config`` keys :func:`node_config_credentials` reads.
NODE_CLIENT_ID = "fedsec-client-id"
NODE_IDENTITY = "fedsec-identity"
NODE_ROSTER = "fedsec-roster"


class FlowerClientError(FLError):
    """The app's own train function returned something the mod cannot aggregate."""


@dataclass(frozen=True)
class ClientCredentials:
    """Who this node is to fedsec: its roster id, its identity key and the roster it trusts."""

    client_id: int
    identity: Identity
    roster: Roster


CredentialsLoader = Callable[[Context], ClientCredentials]


def node_config_credentials(context: Context) -> ClientCredentials:
    """Credentials from the node's config (``flower-supernode --node-config``): the keys
    ``fedsec-client-id``, ``fedsec-identity`` (an identity key file, ``fedsec keygen``) and
    ``fedsec-roster`` (the roster file)."""
    from wire.credentials import load_identity, load_roster

    config = context.node_config
    missing = [k for k in (NODE_CLIENT_ID, NODE_IDENTITY, NODE_ROSTER) if k not in config]
    if missing:
        raise FlowerClientError(
            f"node config lacks {missing}: start the SuperNode with --node-config "
            f'\'{NODE_CLIENT_ID}=<id> {NODE_IDENTITY}="<key file>" {NODE_ROSTER}="<roster>"\''
        )
    roster, _ = load_roster(Path(str(config[NODE_ROSTER])))
    client_id = int(config[NODE_CLIENT_ID])
    identity = load_identity(Path(str(config[NODE_IDENTITY])))
    if roster.get(client_id) != identity.public_bytes:
        raise FlowerClientError(
            f"the identity key {config[NODE_IDENTITY]} is not the roster's key of client "
            f"{client_id}"
        )
    return ClientCredentials(client_id, identity, roster)


class FedsecMod:
    """A Flower mod that replaces ``secaggplus_mod`` with fedsec's secure aggregation."""

    def __init__(
        self,
        credentials: CredentialsLoader = node_config_credentials,
        policy: ClientPolicy | None = None,
    ) -> None:
        self._credentials = credentials
        self._policy = policy or ClientPolicy()
        #: Credentials per node id: loaded once per process (they do not change in a run).
        self._loaded: dict[int, ClientCredentials] = {}

    def __call__(
        self, msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if not msg.has_content() or RECORD not in msg.content.config_records:
            return call_next(msg, ctxt)
        record = msg.content.config_records[RECORD]
        stage, payload = record.get("stage"), record.get("payload")
        try:
            if not isinstance(payload, bytes):
                raise FlowerPlanError("a fedsec message without a bytes payload")
            if stage == STAGE_JOIN:
                return self._join(msg, ctxt, payload)
            if stage == STAGE_SETUP:
                return self._setup(msg, ctxt, payload, call_next)
            if stage == STAGE_SECAGG:
                return self._secagg(msg, ctxt, payload)
            if stage == STAGE_END:
                ctxt.state.config_records.pop(STATE, None)
                return _reply(msg, STAGE_END, b"")
            raise UnexpectedMessage(f"unknown fedsec stage {stage!r}")
        except (SecAggError, FLError) as exc:
            ctxt.state.config_records.pop(STATE, None)  # fail closed: nothing survives
            reason = f"{type(exc).__name__}: {exc}"
            log.error("node %d leaves the fedsec round: %s", msg.metadata.dst_node_id, reason)
            return _reply(msg, STAGE_ABORT, reason.encode("utf-8"))

    # --- stages -----------------------------------------------------------------------------

    def _creds(self, ctxt: Context) -> ClientCredentials:
        if ctxt.node_id not in self._loaded:
            self._loaded[ctxt.node_id] = self._credentials(ctxt)
        return self._loaded[ctxt.node_id]

    def _join(self, msg: Message, ctxt: Context, nonce: bytes) -> Message:
        creds = self._creds(ctxt)
        signed = join_signed_bytes(nonce, msg.metadata.run_id, msg.metadata.dst_node_id,
                                   creds.client_id)  # fmt: skip
        reply = _reply(msg, STAGE_JOIN, nonce)
        record = reply.content.config_records[RECORD]
        record["client_id"] = creds.client_id
        record["signature"] = creds.identity.sign(signed)
        return reply

    def _setup(
        self,
        msg: Message,
        ctxt: Context,
        plan_bytes: bytes,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        ctxt.state.config_records.pop(STATE, None)  # a new round replaces any earlier session
        creds = self._creds(ctxt)
        round_ = FlowerRound.from_bytes(plan_bytes)
        plan = round_.plan
        params = plan.secagg_params()
        if creds.client_id not in params.cohort:
            raise UnknownClient(f"client {creds.client_id} is not in this round's cohort")
        self._policy.check(params)  # refuse before spending time on training
        if "arrays" not in msg.content.array_records:
            raise FlowerPlanError("the setup message carries no 'arrays' record (global model)")
        received = msg.content.array_records["arrays"]
        global_arrays = {name: array.numpy() for name, array in received.items()}
        layout = layout_of(global_arrays.items())
        binding = round_binding(plan_bytes, arrays_digest(global_arrays))
        # The app trains on exactly what was bound: the arrays received and the plan's options.
        train_config: dict[str, ConfigRecordValues] = {
            "server-round": plan.index + 1,
            "proximal-mu": round_.options.prox_mu,
        }
        if round_.options.lr is not None:
            train_config["lr"] = round_.options.lr
        msg.content = RecordDict({"arrays": received, "config": ConfigRecord(train_config)})
        trained = call_next(msg, ctxt)
        delta, samples = _delta(trained, global_arrays, layout)
        strategy = build_strategy(round_.strategy, delta.size)
        dp = plan.codec.dp is not None
        unit, weight = client_contribution(strategy, delta, samples, None, dp=dp)
        encoded = plan.codec.encode(unit, weight)
        session = ClientSession(
            creds.client_id,
            creds.identity,
            creds.roster,
            params,
            encoded.vector,
            context=plan.client_context(binding),
            policy=self._policy,
        )
        first = session.start()
        _save(ctxt, session)
        return _reply(msg, STAGE_SECAGG, encode_message(first))

    def _secagg(self, msg: Message, ctxt: Context, payload: bytes) -> Message:
        if STATE not in ctxt.state.config_records:
            raise UnexpectedMessage("a secure-aggregation message outside a round this node set up")
        state = ctxt.state.config_records[STATE]["session"]
        if not isinstance(state, bytes):
            raise UnexpectedMessage("the node's stored fedsec session is unreadable")
        creds = self._creds(ctxt)
        session = ClientSession.from_state(state, creds.identity, creds.roster, self._policy)
        incoming = decode_message(payload)
        if not isinstance(incoming, SERVER_MESSAGE_TYPES):
            raise UnexpectedMessage(f"the server sent a {type(incoming).__name__}")
        reply = session.handle(incoming)  # raises (and aborts) on any violation
        _save(ctxt, session)
        return _reply(msg, STAGE_SECAGG, encode_message(reply))


def _delta(
    trained: Message,
    global_arrays: dict[str, np.ndarray],
    layout: tuple[tuple[str, tuple[int, ...]], ...],
) -> tuple[np.ndarray, int]:
    """``trained - global`` as one float32 vector, and the sample count the app reported."""
    if not trained.has_content():
        raise FlowerClientError(f"the app's train function failed: {trained.error.reason}")
    content = trained.content
    records = list(content.array_records.values())
    if len(records) != 1:
        raise FlowerClientError(
            f"the app's train reply must hold one ArrayRecord (the trained arrays), got "
            f"{len(records)}"
        )
    arrays: ArrayRecord = records[0]
    metrics = [m for m in content.metric_records.values() if "num-examples" in m]
    if len(metrics) != 1:
        raise FlowerClientError(
            "the app's train reply must report 'num-examples' in one MetricRecord"
        )
    samples = metrics[0]["num-examples"]
    if isinstance(samples, bool) or not isinstance(samples, int | float) or samples < 1:
        raise FlowerClientError(f"num-examples must be a positive integer, got {samples!r}")
    new = flatten({name: a.numpy() for name, a in arrays.items()}, layout)
    delta = (new - flatten(global_arrays, layout)).astype(np.float32)
    check_finite(delta, "update")
    return delta, int(samples)


def _save(ctxt: Context, session: ClientSession) -> None:
    ctxt.state.config_records[STATE] = ConfigRecord({"session": session.export_state()})


def _reply(msg: Message, stage: str, payload: bytes) -> Message:
    content = RecordDict({RECORD: ConfigRecord({"stage": stage, "payload": payload})})
    return Message(content, reply_to=msg)

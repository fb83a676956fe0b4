"""The server side of fedsec inside a Flower ``ServerApp``: it replaces ``SecAggPlusWorkflow``.

::

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        workflow = FedsecWorkflow(config, roster, max_samples=...)
        result = workflow.start(grid, initial_arrays, evaluate_fn=...)

``config`` is the :class:`~fl_core.federation.FederationConfig` that ``fedsec simulate`` runs
(institutions, rounds, strategy, clip, corrupt/dropout fractions, DP, seed): the workflow builds
its strategy, encoding, session shape and DP calibration through
:class:`~fl_core.federation.Federation` itself, so a Flower run and ``fedsec simulate`` of the
same config plan the same rounds. One round:

1. **join**: a fresh nonce to every connected node; each answers with its roster id and an
   Ed25519 signature over (nonce, run id, node id, roster id), checked against the roster. Only
   then does the workflow route a roster id's messages to that node and accept its replies;
2. the cohort (the config's seeded sampler over institution names; members that did not join
   are left out) and a :class:`~fl_core.round.RoundPlan` with a fresh ``os.urandom(32)``
   session id;
3. **setup**: the plan bytes and the global arrays to every cohort member; the mod trains and
   answers with its first protocol message;
4. the stages of :class:`~secagg.protocol.ServerSession`: every client message is fed to
   ``receive`` (a reply whose sender is not the roster id that joined at its node is discarded),
   ``close_stage`` gives the next messages, until the session releases the sum or aborts;
5. the codec decodes the sum, the strategy turns it into the next global arrays, ``evaluate_fn``
   scores them. An aborted round releases nothing and leaves the global model as it was; the
   clients still in it are told to erase their sessions (``end``).

Flower's node ids only route; see :mod:`fl_core.flower` for what Flower's node authentication
gives and does not give.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fl_core.flower import require_flwr

require_flwr()

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fl_core.aggregation import MaskingBackend  # noqa: E402
from fl_core.federation import (  # noqa: E402
    ClientUpdate,
    Federation,
    FederationConfig,
    FederationConfigError,
    PrivacyBudgetExhausted,
    choose_graph,
)
from fl_core.flower.plan import (  # noqa: E402
    NONCE_BYTES,
    RECORD,
    STAGE_ABORT,
    STAGE_END,
    STAGE_JOIN,
    STAGE_SECAGG,
    STAGE_SETUP,
    FlowerRound,
    Layout,
    flatten,
    join_signed_bytes,
    layout_of,
    unflatten,
)
from fl_core.round import RoundPlan  # noqa: E402
from fl_core.strategies import ClientOptions  # noqa: E402
from secagg.errors import ProtocolAbort, SecAggError  # noqa: E402
from secagg.keys import Roster  # noqa: E402
from secagg.messages import decode_message, encode_message  # noqa: E402
from secagg.protocol import ServerSession, SumBackend  # noqa: E402

log = logging.getLogger("fedsec.flower")

#: (round index, global arrays) -> metrics, e.g. eval loss per held-out set.
EvaluateFn = Callable[[int, ArrayRecord], Mapping[str, float]]


@dataclass
class FlowerRoundRecord:
    """What the server saw of one round (no individual update: only sums are ever released)."""

    round: int
    cohort: tuple[int, ...]
    contributors: tuple[int, ...] = ()
    aborted: str | None = None  # why nothing was released
    left: dict[int, str] = field(default_factory=dict)  # client id -> the reason it gave
    stage_s: dict[str, float] = field(default_factory=dict)  # wall time per stage
    server_s: dict[str, float] = field(default_factory=dict)  # server compute per stage
    upload_bytes: dict[int, int] = field(default_factory=dict)  # protocol bytes per client
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FlowerResult:
    arrays: ArrayRecord
    global_vector: np.ndarray
    rounds: list[FlowerRoundRecord]


class _TrainsOnNodes:
    """Federation's trainer slot: under Flower, local training runs on the nodes."""

    def train(
        self, client: str, round_index: int, global_vector: np.ndarray, options: ClientOptions
    ) -> ClientUpdate:
        raise FederationConfigError("under Flower, local training runs in the ClientApps")


class FedsecWorkflow:
    """fedsec's secure aggregation and strategy over a Flower ``Grid``.

    ``roster``: the institutions' identity keys, ids 1..N in the order of the sorted institution
    names of ``config`` (the ids :class:`~fl_core.federation.Federation` gives them).
    ``max_samples``: the most samples any institution trains on (the weighted encoding's bound,
    as ``fedsec simulate`` computes it). ``timeout``: seconds each stage waits for replies
    (None: until every message is answered). ``backend``: where the server's heavy sums run
    (e.g. :class:`server.parallel_unmask.ParallelSum`; default: this process).
    """

    def __init__(
        self,
        config: FederationConfig,
        roster: Roster,
        *,
        max_samples: int,
        timeout: float | None = None,
        backend: SumBackend | None = None,
        min_nodes: int | None = None,
    ) -> None:
        if config.backend != MaskingBackend.name:
            raise FederationConfigError(
                f"the Flower workflow runs the masking backend, not {config.backend!r}"
            )
        self.config = config
        self.roster = roster
        self.max_samples = max_samples
        self.timeout = timeout
        self.backend = backend
        self.min_nodes = config.cohort if min_nodes is None else min_nodes
        #: Filled by :meth:`start`: the federation whose plan the rounds follow.
        self.federation: Federation | None = None

    # --- the run ----------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        evaluate_fn: EvaluateFn | None = None,
        *,
        node_wait_s: float = 600.0,
    ) -> FlowerResult:
        """Run ``config.rounds`` rounds from ``initial_arrays``; returns the final arrays."""
        arrays = {name: a.numpy() for name, a in initial_arrays.items()}
        layout = layout_of(arrays.items())
        vector = flatten(arrays, layout)
        fed = Federation(
            self.config,
            _TrainsOnNodes(),
            lambda _v: {},
            vector,
            self.max_samples,
        )
        if fed.strategy.contribution_size() != fed.dim:
            raise FederationConfigError(
                f"strategy {fed.strategy.name} sends control variates, which the Flower "
                "round plan does not carry; choose a strategy without them"
            )
        if set(self.roster) != set(fed.ids.values()):
            raise FederationConfigError(
                f"the roster lists ids {sorted(self.roster)[:10]}, the config's institutions "
                f"are ids 1..{len(fed.ids)} (sorted by name)"
            )
        self.federation = fed
        self._wait_for_nodes(grid, node_wait_s)
        records = []
        for r in range(self.config.rounds):
            record = self._round(grid, fed, r, layout)
            global_arrays = _array_record(fed.global_vector, layout)
            if evaluate_fn is not None:
                record.metrics = {k: float(v) for k, v in evaluate_fn(r, global_arrays).items()}
            log.info("round %d: %s", r + 1, _summary(record))
            records.append(record)
        return FlowerResult(_array_record(fed.global_vector, layout), fed.global_vector, records)

    def _wait_for_nodes(self, grid: Grid, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while len(list(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise FederationConfigError(
                    f"only {len(list(grid.get_node_ids()))} Flower nodes connected in "
                    f"{wait_s:.0f} s; the federation needs {self.min_nodes}"
                )
            time.sleep(0.2)

    def _round(self, grid: Grid, fed: Federation, r: int, layout: Layout) -> FlowerRoundRecord:
        names = fed.sampler.sample(r, self.config.clients)
        self._check_budget(fed, names)
        sampled = tuple(sorted(fed.ids[n] for n in names))
        begin = time.perf_counter()
        node_of = self._join(grid, sampled)
        cohort = tuple(u for u in sampled if u in node_of)
        record = FlowerRoundRecord(r, cohort)
        record.stage_s["join"] = time.perf_counter() - begin
        masking = fed.backend
        if not isinstance(masking, MaskingBackend):  # guarded in __init__
            raise FederationConfigError("the Flower workflow runs the masking backend")
        try:
            shape = masking.shape
            if len(cohort) != self.config.cohort:  # members that did not join are left out
                shape = choose_graph(len(cohort), self.config.secagg)
            plan = RoundPlan(
                r,
                os.urandom(32),
                cohort,
                shape,
                masking.encoding.codec(len(cohort)),
                masking.min_survivors,
            )
            params = plan.secagg_params()
            server = ServerSession(params, self.roster, False, backend=self.backend)
        except (SecAggError, FederationConfigError) as exc:
            record.aborted = f"{type(exc).__name__}: {exc}"
            return record
        plan_bytes = FlowerRound(plan, fed.strategy.name, fed.strategy.client_options()).to_bytes()
        client_of = {node: u for u, node in node_of.items()}
        global_arrays = _array_record(fed.global_vector, layout)
        stage = params.stages[0].value
        outgoing = [(u, _content(STAGE_SETUP, plan_bytes, global_arrays)) for u in cohort]
        while True:
            begin = time.perf_counter()
            replies = self._exchange(grid, node_of, outgoing, r)
            for reply in replies:
                self._absorb(server, record, client_of, reply)
            closing = time.perf_counter()
            try:
                messages = server.close_stage()
            except ProtocolAbort as exc:
                record.aborted = f"{type(exc).__name__}: {exc}"
                # Tell every client still in the round to erase its session (best effort).
                reason = record.aborted.encode("utf-8")
                ended = [(u, _content(STAGE_END, reason)) for u in cohort if u not in record.left]
                self._exchange(grid, node_of, ended, r)
                return record
            finally:
                record.server_s[stage] = time.perf_counter() - closing
                record.stage_s[stage] = time.perf_counter() - begin
            if not messages:
                break
            stage = server.stage.value
            outgoing = [(m.recipient, _content(STAGE_SECAGG, encode_message(m))) for m in messages]
        result = server.result
        agg = plan.codec.decode(result.sum, len(result.contributors))
        fed.global_vector = fed.strategy.aggregate(fed.global_vector, agg)  # float32
        names_of = {uid: name for name, uid in fed.ids.items()}
        fed.contributions.update(names_of[u] for u in result.contributors)
        record.contributors = result.contributors
        return record

    def _check_budget(self, fed: Federation, names: Sequence[str]) -> None:
        """With DP: the same refusal as :meth:`Federation.run_round` before anyone trains."""
        if fed.calibration is None:
            return
        most = fed.calibration.participations
        spent = sorted(n for n in names if fed.contributions[n] >= most)
        if spent:
            raise PrivacyBudgetExhausted(
                f"institutions {spent} are already in {most} released sums, the most the DP "
                "noise was calibrated for"
            )

    # --- Flower messaging -------------------------------------------------------------------

    def _join(self, grid: Grid, wanted: Sequence[int]) -> dict[int, int]:
        """Roster id -> Flower node id, for the ids in ``wanted`` that proved their identity.
        A node whose signature does not verify, or two nodes proving the same id, are left out
        (the second case cannot happen without a leaked identity key; both are logged)."""
        nonce = os.urandom(NONCE_BYTES)
        nodes = list(grid.get_node_ids())
        messages = [
            Message(_content(STAGE_JOIN, nonce), dst_node_id=n, message_type="train") for n in nodes
        ]
        run_id = grid.run.run_id
        proven: dict[int, list[int]] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            try:
                record = _record(reply, STAGE_JOIN)
                client_id, signature = record["client_id"], record["signature"]
                if not isinstance(client_id, int) or not isinstance(signature, bytes):
                    raise ProtocolAbort("join reply without an integer id and a signature")
                if client_id not in self.roster:
                    raise ProtocolAbort(f"node claims client id {client_id}, not in the roster")
                signed = join_signed_bytes(nonce, run_id, node, client_id)
                self.roster.verify(client_id, signature, signed, "join")
            except (SecAggError, KeyError) as exc:
                log.warning("node %d not admitted to the round: %s", node, exc)
                continue
            proven.setdefault(client_id, []).append(node)
        out = {}
        for u, at in proven.items():
            if len(at) > 1:
                log.error("client %d proved its identity at nodes %s; leaving it out", u, at)
            elif u in wanted:
                out[u] = at[0]
        return out

    def _exchange(
        self,
        grid: Grid,
        node_of: Mapping[int, int],
        outgoing: Sequence[tuple[int, RecordDict]],
        round_index: int,
    ) -> list[Message]:
        messages = [
            Message(content, dst_node_id=node_of[u], message_type="train",
                    group_id=str(round_index + 1))
            for u, content in outgoing
        ]  # fmt: skip
        return list(grid.send_and_receive(messages, timeout=self.timeout))

    def _absorb(
        self,
        server: ServerSession,
        record: FlowerRoundRecord,
        client_of: Mapping[int, int],
        reply: Message,
    ) -> None:
        """One reply into the session; anything wrong with it only drops its sender."""
        node = reply.metadata.src_node_id
        u = client_of.get(node)
        if u is None:
            log.warning("reply from node %d, which did not join this round: ignored", node)
            return
        if reply.has_error():
            record.left[u] = f"the ClientApp failed: {reply.error.reason}"
            server.withdraw(u)
            return
        try:
            content = reply.content.config_records[RECORD]
            stage, payload = content["stage"], content["payload"]
        except KeyError:
            record.left[u] = "a reply without the fedsec record"
            server.withdraw(u)
            return
        if not isinstance(payload, bytes):
            record.left[u] = "a reply with a non-bytes payload"
            server.withdraw(u)
            return
        if stage == STAGE_ABORT:
            record.left[u] = payload.decode("utf-8", "replace")
            server.withdraw(u)
            return
        try:
            message = decode_message(payload)
            if message.sender != u:
                raise ProtocolAbort(
                    f"node {node} joined as client {u} but sent a message as {message.sender}"
                )
            record.upload_bytes[u] = record.upload_bytes.get(u, 0) + len(payload)
            server.receive(payload)
        except SecAggError as exc:
            log.warning("round %d: message from client %d discarded: %s", record.round, u, exc)


def _content(stage: str, payload: bytes, arrays: ArrayRecord | None = None) -> RecordDict:
    records: dict[str, Any] = {RECORD: ConfigRecord({"stage": stage, "payload": payload})}
    if arrays is not None:
        records["arrays"] = arrays
    return RecordDict(records)


def _record(reply: Message, stage: str) -> ConfigRecord:
    if reply.has_error():
        raise ProtocolAbort(f"the ClientApp failed: {reply.error.reason}")
    record = reply.content.config_records[RECORD]
    if record.get("stage") != stage:
        raise ProtocolAbort(f"expected a {stage} reply, got {record.get('stage')!r}")
    return record


def _array_record(vector: np.ndarray, layout: Layout) -> ArrayRecord:
    return ArrayRecord({name: Array(a) for name, a in unflatten(vector, layout).items()})


def _summary(record: FlowerRoundRecord) -> str:
    if record.aborted:
        return f"aborted, nothing released ({record.aborted})"
    metrics = " ".join(f"{k}={v:.4f}" for k, v in record.metrics.items())
    return f"{len(record.contributors)}/{len(record.cohort)} contributed {metrics}"

"""The round loop: sample a cohort, send the round, drive the secure-aggregation stages with a
deadline each, aggregate, apply the update, checkpoint; and the checks on every upload.

Threads: one loop thread runs :meth:`RoundRunner.run`; gRPC handler threads call
:meth:`RoundRunner.upload_limit` and :meth:`RoundRunner.deliver`. One condition variable guards
the current :class:`ServerSession`, so a message is absorbed either before a stage closes or is
refused as late; the loop wakes as soon as the last expected message of a stage arrives, or at
the stage deadline, and continues with whoever answered (clients that died are simply missing).

Crash safety: at start the store marks any attempt left ``running`` as aborted, and the round is
rerun under a fresh random session id and fresh neighbour-graph seed, so nothing a client sent
in the aborted attempt can be combined with anything later; the aborted session's running sum
lived only in memory and is gone. The global vector is reloaded from the last completed
checkpoint. Any failed attempt releases nothing (``ServerSession`` wipes its sum) and is rerun.

What a round computes and how the released sum updates the model: :mod:`server.global_model`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import cast

import grpc

from fl_core.wire import fedsec_pb2 as pb
from fl_core.wire.convert import KIND_OF, params_from_config, upload_limit
from secagg.errors import MessageFormatError, ProtocolAbort, SecAggError, SessionMismatch
from secagg.messages import ClientMessage, decode_message, encode_message
from secagg.protocol import PROTOCOL_STAGES, ServerSession, Stage
from server.admission import Refusal
from server.config import ServerConfig
from server.global_model import GlobalModel
from server.outbox import Mailboxes
from server.store import Store

log = logging.getLogger("fedsec.server")

#: A client counts as online if it polled within this many seconds.
ONLINE_WITHIN_S = 15.0


class RoundRunner:
    def __init__(self, config: ServerConfig, store: Store, mailboxes: Mailboxes) -> None:
        self._config = config
        self._store = store
        self._mailboxes = mailboxes
        self._cond = threading.Condition()
        self._session: ServerSession | None = None
        self._stop = threading.Event()
        self.checkpoint_dir = config.state_dir / "checkpoints"
        self.model = GlobalModel(config)
        self.next_round = 0

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    # --- called from gRPC handler threads -------------------------------------------------

    def _current(self, session_id: bytes) -> ServerSession:
        session = self._session
        if session is None:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "no round is in progress")
        if session_id != session.params.session_id:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"message for session {session_id[:8].hex()}, the current session is "
                f"{session.params.session_id[:8].hex()} (stale or replayed)",
            )
        return session

    def upload_limit(self, client_id: int, header: pb.SubmitHeader) -> int:
        """Bytes this upload may carry; refuses a wrong session or kind before allocation."""
        with self._cond:
            params = self._current(header.session_id).params
        if header.kind not in KIND_OF.values():
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"unknown message kind {header.kind}")
        if client_id not in params.cohort:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in this cohort"
            )
        return upload_limit(header.kind, params.ring_bits, params.dim, len(params.cohort))

    def deliver(self, client_id: int, header: pb.SubmitHeader, raw: bytes) -> None:
        try:
            message = decode_message(raw)
        except MessageFormatError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {exc}") from None
        if message.sender != client_id:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client_id} sent a message claiming sender {message.sender}",
            )
        if KIND_OF.get(type(message)) != header.kind:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"header declares kind {header.kind}, payload is {type(message).__name__}",
            )
        with self._cond:
            session = self._current(header.session_id)
            try:
                session.receive(cast(ClientMessage, message))
            except SessionMismatch as exc:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            except SecAggError as exc:
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}"
                ) from None
            self._cond.notify_all()

    # --- the loop ---------------------------------------------------------------------------

    def recover(self) -> None:
        for record in self._store.recover():
            log.warning(
                "round %d attempt %d (session %s) was in flight when the server stopped: "
                "aborted; it will be rerun under a new session",
                record.round_number,
                record.attempt,
                record.session_id[:8].hex(),
            )
        last = self._store.last_completed()
        if last is not None and last.checkpoint is not None:
            self.model.restore(self.checkpoint_dir / last.checkpoint)
            self.next_round = last.round_number + 1
            log.info("resuming after completed round %d (%s)", last.round_number, last.checkpoint)

    def run(self) -> None:
        self.recover()
        while self.next_round < self._config.rounds.rounds and not self._stop.is_set():
            # Cohorts are drawn from the OS CSPRNG: who takes part in a round should not be
            # predictable (or steerable) from the public config.
            if self._run_attempt(self.next_round, random.SystemRandom()):
                self.next_round += 1
        if not self._stop.is_set():
            log.info("all %d rounds completed", self._config.rounds.rounds)

    def _wait_for_clients(self) -> list[int] | None:
        rounds = self._config.rounds
        deadline = time.monotonic() + rounds.join_timeout_s
        warned = False
        while not self._stop.is_set():
            online = self._mailboxes.online(ONLINE_WITHIN_S)
            if len(online) >= rounds.cohort_size or (
                len(online) >= rounds.min_clients and time.monotonic() >= deadline
            ):
                return online
            if time.monotonic() >= deadline and not warned:
                log.warning(
                    "%d clients online, waiting for at least %d", len(online), rounds.min_clients
                )
                warned = True
            self._stop.wait(0.1)
        return None

    def _round_config(self, round_number: int, cohort: list[int]) -> tuple[pb.RoundConfig, bytes]:
        rounds = self._config.rounds
        config = pb.RoundConfig(
            round_number=round_number,
            session_id=os.urandom(32),
            ring_bits=rounds.ring_bits,
            threshold=rounds.threshold,
            cohort=sorted(cohort),
            neighbours=rounds.neighbours,
            graph_seed=os.urandom(32),
        )
        payload = self.model.fill_round(config)
        return config, payload

    def _run_attempt(self, round_number: int, rng: random.Random) -> bool:
        online = self._wait_for_clients()
        if online is None:
            return False
        cohort = sorted(rng.sample(online, min(len(online), self._config.rounds.cohort_size)))
        config, model_payload = self._round_config(round_number, cohort)
        params = params_from_config(config)
        session = ServerSession(params, self._config.roster)
        attempt = self._store.begin_round(round_number, params.session_id, params.cohort)
        log.info(
            "round %d attempt %d: session %s, cohort %s",
            round_number,
            attempt,
            params.session_id[:8].hex(),
            list(params.cohort),
        )
        start = pb.ServerItem(round_start=pb.RoundStart(config=config.SerializeToString()))
        with self._cond:
            self._session = session
        for client_id in params.cohort:
            item = pb.ServerItem()
            item.CopyFrom(start)
            self._mailboxes.of(client_id).push(item, model_payload)
        try:
            for stage in PROTOCOL_STAGES:
                timeout = (
                    self._config.rounds.join_timeout_s
                    if stage is Stage.ADVERTISE_KEYS
                    else self._config.rounds.stage_timeout_s
                )
                self._run_stage(attempt, session, stage, timeout)
            result = session.result
        except ProtocolAbort as exc:
            self._end_attempt(attempt, params.cohort, round_number, f"{type(exc).__name__}: {exc}")
            return False
        finally:
            with self._cond:
                self._session = None
        if self._stop.is_set():
            return False
        self.model.apply(config, result)
        path = self.model.save(self.checkpoint_dir, round_number)
        self._store.complete_round(attempt, result.contributors, path.name)
        log.info(
            "round %d completed: %d contributors %s, checkpoint %s",
            round_number,
            len(result.contributors),
            list(result.contributors),
            path.name,
        )
        final = round_number + 1 >= self._config.rounds.rounds
        end = pb.RoundEnd(round_number=round_number, completed=True, final=final)
        self._broadcast_end(end, params.cohort)
        return True

    def _run_stage(
        self, attempt: int, session: ServerSession, stage: Stage, timeout: float
    ) -> None:
        began = time.monotonic()
        deadline = began + timeout
        with self._cond:
            while session.pending and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stop.is_set():
                session.abort("server shutting down")
                raise ProtocolAbort("server shutting down")
            expected = len(session.expected_senders)
            missing = sorted(session.pending)
            try:
                outgoing = session.close_stage()
            finally:
                self._store.record_stage(
                    attempt,
                    stage.value,
                    expected,
                    expected - len(missing),
                    bool(missing),
                    time.monotonic() - began,
                )
        if missing:
            log.warning("stage %s closed at its deadline without %s", stage.value, missing)
        else:
            log.info("stage %s complete (%d clients)", stage.value, expected)
        session_id = session.params.session_id
        for message in outgoing:
            self._mailboxes.of(message.recipient).push(
                pb.ServerItem(secagg=pb.SecAggItem(session_id=session_id)),
                encode_message(message),
            )

    def _end_attempt(
        self, attempt: int, cohort: tuple[int, ...], round_number: int, reason: str
    ) -> None:
        self._store.abort_round(attempt, reason)
        log.warning(
            "round %d attempt %d aborted, nothing released: %s", round_number, attempt, reason
        )
        self._broadcast_end(pb.RoundEnd(round_number=round_number, reason=reason), cohort)

    def _broadcast_end(self, end: pb.RoundEnd, cohort: tuple[int, ...]) -> None:
        recipients = (
            set(cohort) | set(self._mailboxes.online(ONLINE_WITHIN_S)) if end.final else set(cohort)
        )
        for client_id in sorted(recipients):
            item = pb.ServerItem()
            item.round_end.CopyFrom(end)
            self._mailboxes.of(client_id).push(item)

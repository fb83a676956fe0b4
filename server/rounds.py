"""The round loop: sample a cohort, send the round, drive the secure-aggregation stages with a
deadline each, aggregate, apply the update, checkpoint; and the checks on every upload.

Threads: one loop thread runs :meth:`RoundRunner.run`; gRPC handler threads call
:meth:`RoundRunner.upload_limit` and :meth:`RoundRunner.deliver`. One condition variable guards
the current :class:`ServerSession`, so a message is absorbed either before a stage closes or is
refused as late; the loop wakes as soon as the last expected message of a stage arrives, or at
the stage deadline, and continues with whoever answered (clients that died are simply missing).

Crash safety: at start the store marks any attempt left ``running`` as aborted, and the round is
rerun under a fresh random session id (and, under SecAgg+, a fresh graph seed the clients fix
inside the session), so nothing a client sent
in the aborted attempt can be combined with anything later; the aborted session's running sum
lived only in memory and is gone. The global vector is reloaded from the last completed
checkpoint. Any failed attempt releases nothing (``ServerSession`` wipes its sum) and is rerun.

Backends (``[rounds] backend``): both share sampling, RoundStart, deadlines, the store, the
strategy step and checkpoints; only the middle differs. ``masking`` drives the
:class:`ServerSession` stages; ``ckks`` drives a :class:`server.ckks_round.CkksRound`: uploads
until the join deadline (clients train first), then the aggregate to one decryptor after another
until one answers within ``stage_timeout_s``. Under ckks the server never holds a key that
decrypts anything; the loop applies the sum a client released.

What a round computes and how the released sum updates the model: :mod:`server.global_model`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import cast

import grpc

from fl_core.strategies import AggregateInput
from fl_core.wire import fedsec_pb2 as pb
from fl_core.wire.convert import KIND_OF, params_from_config, upload_limit
from fl_core.wire.he_round import he_upload_limit
from secagg.errors import MessageFormatError, ProtocolAbort, SecAggError, SessionMismatch
from secagg.messages import ClientMessage, decode_message, encode_message
from secagg.protocol import ServerSession, Stage, SumBackend
from server.admission import Refusal
from server.ckks_round import CkksRound, CkksStage
from server.config import ServerConfig
from server.global_model import GlobalModel
from server.outbox import Mailboxes
from server.store import Store

log = logging.getLogger("fedsec.server")

#: A client counts as online if it polled within this many seconds.
ONLINE_WITHIN_S = 15.0
#: Submit kinds of the ckks backend; every other kind is a masking protocol message.
HE_KINDS = (pb.HE_UPDATE, pb.HE_DECRYPTED_SUM)


class RoundRunner:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        mailboxes: Mailboxes,
        sum_backend: SumBackend | None = None,
    ) -> None:
        self._config = config
        self._sum_backend = sum_backend  # None: the session's own, in this process
        self._store = store
        self._mailboxes = mailboxes
        self._cond = threading.Condition()
        self._session: ServerSession | None = None
        self._ckks: CkksRound | None = None
        self._stop = threading.Event()
        self.checkpoint_dir = config.state_dir / "checkpoints"
        self.model = GlobalModel(config)
        self.next_round = 0

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    # --- called from gRPC handler threads -------------------------------------------------

    def _check_session(self, current: bytes, session_id: bytes) -> None:
        if session_id != current:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"message for session {session_id[:8].hex()}, the current session is "
                f"{current[:8].hex()} (stale or replayed)",
            )

    def _current(self, session_id: bytes) -> ServerSession:
        session = self._session
        if session is None:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                "a masking message in a ckks round (client and server disagree on the backend)"
                if self._ckks is not None
                else "no round is in progress",
            )
        self._check_session(session.params.session_id, session_id)
        return session

    def _current_ckks(self, session_id: bytes) -> CkksRound:
        ckks = self._ckks
        if ckks is None:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                "a ckks upload in a masking round (client and server disagree on the backend)"
                if self._session is not None
                else "no round is in progress",
            )
        self._check_session(ckks.session_id, session_id)
        return ckks

    def upload_limit(self, client_id: int, header: pb.SubmitHeader) -> int:
        """Bytes this upload may carry; refuses a wrong session or kind before allocation."""
        if header.kind in HE_KINDS:
            with self._cond:
                ckks = self._current_ckks(header.session_id)
            if client_id not in ckks.cohort:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in this cohort"
                )
            return he_upload_limit(header.kind, ckks.params, ckks.config.dim)
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
        if header.kind in HE_KINDS:
            self._deliver_ckks(client_id, header, raw)
            return
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
            self._absorb(lambda: session.receive(cast(ClientMessage, message)))

    def _deliver_ckks(self, client_id: int, header: pb.SubmitHeader, raw: bytes) -> None:
        # The sender is the authenticated client: a CKKS upload names no sender of its own.
        # Checking and adding a ciphertext happens under the lock, as a masked input is added
        # under it: the stage cannot close half-way through an addition.
        with self._cond:
            ckks = self._current_ckks(header.session_id)
            if header.kind == pb.HE_UPDATE:
                self._absorb(lambda: ckks.receive_update(client_id, raw))
            else:
                self._absorb(lambda: ckks.receive_release(client_id, raw))
                log.info("decrypted sum released by client %d", client_id)

    def _absorb(self, receive: Callable[[], None]) -> None:
        """Run one receive step (lock held); wake the loop; map refusals to gRPC statuses."""
        try:
            receive()
        except SessionMismatch as exc:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except SecAggError as exc:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}"
            ) from None
        finally:
            # A refused upload may also change who is still awaited (ckks stops waiting for
            # a client whose only upload failed).
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
        config = pb.RoundConfig(round_number=round_number, session_id=os.urandom(32))
        config.cohort.extend(sorted(cohort))
        ckks = self._config.ckks
        if ckks is None:
            shape = rounds.session_shape(len(cohort))
            config.backend = pb.BACKEND_MASKING
            config.ring_bits = rounds.ring_bits
            config.threshold = shape.threshold
            config.neighbours = shape.neighbours or 0
            config.quorum = shape.quorum
        else:
            params = ckks.public.params
            config.backend = pb.BACKEND_CKKS
            config.ckks.poly_modulus_degree = params.poly_modulus_degree
            config.ckks.coeff_mod_bit_sizes.extend(params.coeff_mod_bit_sizes)
            config.ckks.scale_bits = params.scale_bits
            config.ckks.min_contributors = params.min_contributors
            config.ckks.fingerprint = ckks.public.fingerprint
        payload = self.model.fill_round(config)
        return config, payload

    def _run_attempt(self, round_number: int, rng: random.Random) -> bool:
        online = self._wait_for_clients()
        if online is None:
            return False
        cohort = sorted(rng.sample(online, min(len(online), self._config.rounds.cohort_size)))
        config, model_payload = self._round_config(round_number, cohort)
        # The backend's round state is built (and its parameters checked) before the attempt is
        # recorded, and installed before RoundStart goes out: a client may answer at once.
        drive: Callable[[], tuple[AggregateInput, tuple[int, ...]]]
        ckks_config = self._config.ckks
        ckks = None if ckks_config is None else CkksRound(ckks_config.public, config)
        session: ServerSession | None = None
        if ckks is None:
            params = params_from_config(config)
            session = ServerSession(params, self._config.roster, backend=self._sum_backend)
        attempt = self._store.begin_round(
            round_number, config.session_id, tuple(config.cohort), self._config.rounds.backend
        )
        log.info(
            "round %d attempt %d (%s): session %s, cohort %s",
            round_number,
            attempt,
            self._config.rounds.backend,
            config.session_id[:8].hex(),
            list(config.cohort),
        )
        with self._cond:
            self._session, self._ckks = session, ckks
        if ckks is not None:
            drive = functools.partial(self._drive_ckks, attempt, ckks)
        elif session is not None:
            drive = functools.partial(self._drive_masking, attempt, config, session)
        start = pb.ServerItem(round_start=pb.RoundStart(config=config.SerializeToString()))
        for client_id in config.cohort:
            item = pb.ServerItem()
            item.CopyFrom(start)
            self._mailboxes.of(client_id).push(item, model_payload)
        try:
            released, contributors = drive()
        except ProtocolAbort as exc:
            cohort_ids = tuple(config.cohort)
            self._end_attempt(attempt, cohort_ids, round_number, f"{type(exc).__name__}: {exc}")
            return False
        finally:
            with self._cond:
                self._session = None
                self._ckks = None
        if self._stop.is_set():
            return False
        self.model.apply_sum(released)
        path = self.model.save(self.checkpoint_dir, round_number)
        self._store.complete_round(attempt, contributors, path.name)
        log.info(
            "round %d completed: %d contributors %s, checkpoint %s",
            round_number,
            len(contributors),
            list(contributors),
            path.name,
        )
        final = round_number + 1 >= self._config.rounds.rounds
        end = pb.RoundEnd(round_number=round_number, completed=True, final=final)
        self._broadcast_end(end, tuple(config.cohort))
        return True

    # --- masking ----------------------------------------------------------------------------

    def _drive_masking(
        self, attempt: int, config: pb.RoundConfig, session: ServerSession
    ) -> tuple[AggregateInput, tuple[int, ...]]:
        stages = session.params.stages
        for stage in stages:
            # Clients train before their first message: the first stage waits for that.
            timeout = (
                self._config.rounds.join_timeout_s
                if stage is stages[0]
                else self._config.rounds.stage_timeout_s
            )
            self._run_stage(attempt, session, stage, timeout)
        result = session.result
        return self.model.decode(config, result), result.contributors

    def _run_stage(
        self, attempt: int, session: ServerSession, stage: Stage, timeout: float
    ) -> None:
        began = time.monotonic()
        with self._cond:
            self._wait_while(lambda: session.pending, began + timeout, session.abort)
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
        self._log_stage(stage.value, expected, missing)
        session_id = session.params.session_id
        for message in outgoing:
            self._mailboxes.of(message.recipient).push(
                pb.ServerItem(secagg=pb.SecAggItem(session_id=session_id)),
                encode_message(message),
            )

    # --- ckks -------------------------------------------------------------------------------

    def _drive_ckks(self, attempt: int, ckks: CkksRound) -> tuple[AggregateInput, tuple[int, ...]]:
        rounds = self._config.rounds
        began = time.monotonic()
        with self._cond:
            self._wait_while(lambda: ckks.pending, began + rounds.join_timeout_s, None)
            missing = sorted(ckks.pending)
            try:
                ckks.close_uploads()
            finally:
                arrived = len(ckks.contributors)
                self._store.record_stage(
                    attempt,
                    CkksStage.UPLOAD.value,
                    len(ckks.cohort),
                    arrived,
                    bool(missing),
                    time.monotonic() - began,
                )
        self._log_stage(CkksStage.UPLOAD.value, len(ckks.cohort), missing)
        while True:
            # NoDecryptor (a ProtocolAbort) once the bounded list of decryptors is used up.
            with self._cond:
                decryptor, aggregate = ckks.next_decryptor()
            log.info(
                "asking client %d to decrypt the sum of %s", decryptor, list(ckks.contributors)
            )
            self._mailboxes.of(decryptor).push(
                pb.ServerItem(he_aggregate=pb.HeAggregate(session_id=ckks.session_id)), aggregate
            )
            began = time.monotonic()
            with self._cond:
                self._wait_while(lambda: ckks.pending, began + rounds.stage_timeout_s, None)
                done = ckks.stage is CkksStage.DONE
                self._store.record_stage(
                    attempt,
                    f"{CkksStage.DECRYPT.value}:{decryptor}",
                    1,
                    int(done),
                    not done,
                    time.monotonic() - began,
                )
            if done:
                return ckks.result, ckks.contributors
            log.warning("decryptor %d missed its deadline", decryptor)

    # --- shared -----------------------------------------------------------------------------

    def _wait_while(
        self,
        pending: Callable[[], frozenset[int]],
        deadline: float,
        abort: Callable[[str], None] | None,
    ) -> None:
        """With the lock held: wait until nobody is pending or the deadline passes; raise
        :class:`ProtocolAbort` (after ``abort``, if given) when the server is stopping."""
        while pending() and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        if self._stop.is_set():
            if abort is not None:
                abort("server shutting down")
            raise ProtocolAbort("server shutting down")

    @staticmethod
    def _log_stage(stage: str, expected: int, missing: list[int]) -> None:
        if missing:
            log.warning("stage %s closed at its deadline without %s", stage, missing)
        else:
            log.info("stage %s complete (%d clients)", stage, expected)

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

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
:class:`ServerSession` stages; ``ckks`` drives a :class:`secagg.he.HeServerSession` built from
the round config (:func:`wire.he_round.ckks_spec_of`): uploads until
the join deadline (clients train first), then the aggregate to the round's one decryptor (the
lowest cohort id, named by every contributor's pads), which must answer within
``stage_timeout_s``; otherwise the attempt aborts and the round is rerun under a fresh session.
There is no second decryptor in a session: two decryptors of one session could be handed sums
over different sets, whose difference is one upload. Under ckks the server never holds a key that
decrypts anything; the loop applies the sum a client released.

What a round computes and how the released sum updates the model: :mod:`server.global_model`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc
import numpy as np

from fl_core.aggregation import CkksRoundRecord, UploadRecord
from fl_core.round_config import CkksRound, RoundConfig, SplitTask
from fl_core.strategies import AggregateInput
from fl_core.toml_config import ConfigError
from secagg.errors import (
    MessageFormatError,
    ProtocolAbort,
    SecAggError,
    SessionMismatch,
    SumBackendFailure,
    TooFewSurvivors,
)
from secagg.he import HeServerSession, HeStage, NoDecryptor
from secagg.messages import ClientMessage, decode_message, encode_message
from secagg.params import SessionShape
from secagg.protocol import ServerSession, Stage, SumBackend
from secagg.transcript import Transcript
from server.admission import Refusal
from server.checkpoints import prune_checkpoints
from server.config import ServerConfig
from server.global_model import GlobalModel
from server.outbox import HeAggregate, Mailboxes, RoundEnd, RoundStart, SecAggMessage
from server.run_record import DeploymentRunRecord
from server.store import Store
from wire.convert import KIND_OF, REFUSAL_MAX_BYTES, UploadKind, round_config_bytes, upload_limit
from wire.he_round import ckks_spec_of, decode_release, he_upload_limit

if TYPE_CHECKING:
    from server.split_service import SplitService

log = logging.getLogger("fedsec.server")

#: A client counts as online if it polled within this many seconds.
ONLINE_WITHIN_S = 15.0
#: Submit kinds of the ckks backend; every other kind is a masking protocol message.
HE_KINDS = (UploadKind.HE_UPDATE, UploadKind.HE_DECRYPTED_SUM)
#: How much of a client's ROUND_REFUSAL reason is logged and kept.
_REFUSAL_LOGGED_CHARS = 500
#: Cohorts up to this size are listed in the round's log lines; larger ones are counted.
_COHORT_LISTED = 12


def _ids_text(ids: tuple[int, ...] | list[int]) -> str:
    """A cohort or contributor list for a log line: listed when short, counted when long."""
    ids = list(ids)
    if len(ids) <= _COHORT_LISTED:
        return str(ids)
    return f"{len(ids)} clients (ids {ids[0]}..{ids[-1]})"


def split_task(config: RoundConfig) -> SplitTask:
    """A split model's round's task (the model announces one for every round)."""
    if not isinstance(config.task, SplitTask):
        raise ConfigError(f"round {config.round_number} of a split model has no split task")
    return config.task


@dataclass(frozen=True)
class UploadHeader:
    """What a client's upload declares before its payload (:mod:`server.service` converts the
    wire's header; the token that authenticated the call stays there). ``kind`` is an
    :class:`~wire.convert.UploadKind` code or one this version does not know, which
    :meth:`RoundRunner.upload_limit` refuses. The declared payload size stays with the framing,
    which holds it to that limit before anything is allocated (:func:`wire.framing.read_upload`)."""

    round_number: int
    session_id: bytes
    kind: int


class FederationStopped(Exception):
    """The same round aborted ``max_attempts`` times in a row: retrying will not help."""


#: What a backend's drive returns: the decoded sum, its contributors, the server's record.
Released = tuple[AggregateInput, tuple[int, ...], Transcript | CkksRoundRecord]


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
        self._ckks: HeServerSession | None = None
        self._ckks_uploads: dict[int, UploadRecord] = {}  # accepted uploads, for the record
        #: The server's side of split training (``[task] kind = "split"``), else None.
        self.split: SplitService | None = None
        if config.task.kind == "split":
            from server.split_service import build_split_service

            self.split = build_split_service(config)
        self._stop = threading.Event()
        self.checkpoint_dir = config.state_dir / "checkpoints"
        self.model = GlobalModel(config, None if self.split is None else self.split.layout)
        self.run_record = DeploymentRunRecord(
            config, self.model.calibration, None if self.split is None else self.split.describe()
        )
        self.next_round = 0
        self._attempt: int | None = None
        #: Why the federation stopped early (None while it runs or after it completed).
        self.stopped_because: str | None = None

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

    def _current_ckks(self, session_id: bytes) -> HeServerSession:
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

    def _cohort_of(self, session_id: bytes) -> frozenset[int]:
        """The current round's cohort, whichever backend runs it (lock held)."""
        if self._ckks is not None:
            return self._current_ckks(session_id).cohort
        return frozenset(self._current(session_id).params.cohort)

    def upload_limit(self, client_id: int, header: UploadHeader) -> int:
        """Bytes this upload may carry; refuses a wrong session or kind before allocation."""
        if header.kind == UploadKind.ROUND_REFUSAL:
            with self._cond:
                cohort = self._cohort_of(header.session_id)
            if client_id not in cohort:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in this cohort"
                )
            return REFUSAL_MAX_BYTES
        if header.kind in HE_KINDS:
            with self._cond:
                ckks = self._current_ckks(header.session_id)
            if client_id not in ckks.cohort:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in this cohort"
                )
            return he_upload_limit(header.kind, ckks.params, ckks.spec.dim)
        with self._cond:
            params = self._current(header.session_id).params
        if header.kind not in KIND_OF.values():
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"unknown message kind {header.kind}")
        if client_id not in params.cohort:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED, f"client {client_id} is not in this cohort"
            )
        return upload_limit(header.kind, params.ring_bits, params.dim, len(params.cohort))

    def deliver(self, client_id: int, header: UploadHeader, raw: bytes) -> None:
        if header.kind == UploadKind.ROUND_REFUSAL:
            self._on_refusal(client_id, header, raw)
            return
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

    def _on_refusal(self, client_id: int, header: UploadHeader, raw: bytes) -> None:
        """A client leaves the round and says why: log it with the institution, keep it, and
        stop waiting for that client."""
        text = raw.decode("utf-8", errors="replace")
        reason = "".join(c if c.isprintable() else " " for c in text)[:_REFUSAL_LOGGED_CHARS]
        with self._cond:
            self._cohort_of(header.session_id)  # refuses a stale or foreign session
            if self._session is not None:
                self._session.withdraw(client_id)
            if self._ckks is not None:
                self._ckks.withdraw(client_id)
            attempt = self._attempt
            self._cond.notify_all()
        name = self._config.names.get(client_id, f"client-{client_id}")
        log.warning(
            "client %d (%s) left round %d: %s", client_id, name, header.round_number, reason
        )
        if attempt is not None:
            self._store.record_refusal(attempt, client_id, reason)

    def _deliver_ckks(self, client_id: int, header: UploadHeader, raw: bytes) -> None:
        # The sender is the authenticated client: a CKKS upload names no sender of its own.
        # Checking and adding a ciphertext happens under the lock, as a masked input is added
        # under it: the stage cannot close half-way through an addition.
        with self._cond:
            ckks = self._current_ckks(header.session_id)
            if header.kind == UploadKind.HE_UPDATE:
                self._absorb(lambda: ckks.receive_update(client_id, raw))
                digest = hashlib.sha256(raw).digest()
                self._ckks_uploads[client_id] = UploadRecord(client_id, len(raw), digest)
            else:
                self._absorb(
                    lambda: ckks.receive_release(
                        client_id, decode_release(raw, ckks.session_id, ckks.spec.dim)
                    )
                )
                log.info("decrypted sum released by client %d", client_id)

    def _absorb(self, receive: Callable[[], None]) -> None:
        """Run one receive step (lock held); wake the loop; map refusals to gRPC statuses."""
        try:
            receive()
        except SessionMismatch as exc:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except SumBackendFailure as exc:
            # The server's own worker failed, not the upload: the session is aborted.
            raise Refusal(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from None
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
            server_part = self.model.restore(self.checkpoint_dir / last.checkpoint)
            if self.split is not None:
                if server_part is None:
                    raise ConfigError(
                        f"{last.checkpoint} holds no server part: it was not written by a split "
                        "run; start split training from a fresh state_dir"
                    )
                self.split.set_vector(server_part)
            self.next_round = last.round_number + 1
            log.info("resuming after completed round %d (%s)", last.round_number, last.checkpoint)

    def run(self) -> None:
        """The round loop (call :meth:`recover` first). A round that aborts
        ``[rounds] max_attempts`` times in a row stops the federation with the reasons
        (:attr:`stopped_because`): every client refusing the parameters, or every update being
        refused, does not change by retrying."""
        failures: list[str] = []
        while self.next_round < self._config.rounds.rounds and not self._stop.is_set():
            # Cohorts are drawn from the OS CSPRNG: who takes part in a round should not be
            # predictable (or steerable) from the public config.
            outcome = self._run_attempt(self.next_round, random.SystemRandom())
            if outcome is True:
                self.next_round += 1
                failures = []
            elif isinstance(outcome, str):
                failures.append(outcome)
                if len(failures) >= self._config.rounds.max_attempts:
                    self._give_up(self.next_round, failures)
                    return
        if not self._stop.is_set():
            log.info("all %d rounds completed", self._config.rounds.rounds)

    def _give_up(self, round_number: int, failures: list[str]) -> None:
        distinct = list(dict.fromkeys(failures))
        self.stopped_because = (
            f"round {round_number} aborted {len(failures)} times in a row "
            f"([rounds] max_attempts); last reason: {failures[-1]}"
        )
        log.error(
            "stopping the federation: %s%s",
            self.stopped_because,
            "" if len(distinct) == 1 else f" (earlier: {'; '.join(distinct[:-1])})",
        )
        end = RoundEnd(round_number, reason=self.stopped_because, final=True)
        self._broadcast_end(end, ())

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

    def _round_config(self, round_number: int, cohort: list[int]) -> tuple[RoundConfig, bytes]:
        ckks = self._config.ckks
        backend: SessionShape | CkksRound
        if ckks is None:
            backend = self._config.rounds.session_shape(len(cohort))
        else:
            params = ckks.public.params
            backend = CkksRound(
                params.poly_modulus_degree,
                params.coeff_mod_bit_sizes,
                params.scale_bits,
                params.min_contributors,
                ckks.public.fingerprint,
            )
        split = self._config.task.split
        cut = None
        if self.split is not None and split is not None:
            cut = functools.partial(self.split.task, max_length=split.max_length)
        return self.model.round_config(
            round_number, os.urandom(32), tuple(sorted(cohort)), backend, cut
        )

    def _run_attempt(self, round_number: int, rng: random.Random) -> bool | str | None:
        """True: the round completed; a string: it aborted, why; None: the server is stopping."""
        online = self._wait_for_clients()
        if online is None:
            return None
        began = time.monotonic()
        cohort = sorted(rng.sample(online, min(len(online), self._config.rounds.cohort_size)))
        config, model_payload = self._round_config(round_number, cohort)
        # Split: the steps' task, taken before anything is recorded.
        steps = None if self.split is None else split_task(config)
        # The backend's round state is built (and its parameters checked) before the attempt is
        # recorded, and installed before RoundStart goes out: a client may answer at once.
        drive: Callable[[], Released]
        ckks_config = self._config.ckks
        ckks = (
            None
            if ckks_config is None
            else HeServerSession(ckks_config.public, ckks_spec_of(config))
        )
        session: ServerSession | None = None
        if ckks is None:
            params = config.plan().secagg_params()
            # Masked inputs are not kept: the server's memory stays O(d) (see run_record).
            session = ServerSession(params, self._config.roster, False, backend=self._sum_backend)
        attempt = self._store.begin_round(
            round_number, config.session_id, config.cohort, self._config.rounds.backend
        )
        log.info(
            "round %d attempt %d (%s): session %s, cohort %s",
            round_number,
            attempt,
            self._config.rounds.backend,
            config.session_id[:8].hex(),
            _ids_text(config.cohort),
        )
        with self._cond:
            self._session, self._ckks, self._attempt = session, ckks, attempt
            self._ckks_uploads = {}
        if ckks is not None:
            drive = functools.partial(self._drive_ckks, attempt, ckks)
        elif session is not None:
            drive = functools.partial(self._drive_masking, attempt, config, session)
        split = self.split
        if split is not None and steps is not None:
            # Opened before RoundStart goes out: an institution may open its stream at once.
            split.begin(
                round_number,
                config.session_id,
                config.cohort,
                steps.train.local_steps,
                steps.limits,
            )
            drive = functools.partial(self._split_then, attempt, split, drive)
        # Serialized once: every cohort member hashes these same bytes into what it signs.
        start = RoundStart(round_config_bytes(config))
        for client_id in config.cohort:
            self._mailboxes.of(client_id).push(start, model_payload)
        try:
            released, contributors, server_record = drive()
        except ProtocolAbort as exc:
            cohort_ids = config.cohort
            reason = f"{type(exc).__name__}: {exc}"
            refused = self._store.refusals(attempt)
            if refused:
                reason += f" (refusals: {'; '.join(f'{c}: {why}' for c, why in refused[:5])})"
            if split is not None:
                split.rollback()  # nothing released: the server's part is put back too
            self._end_attempt(attempt, cohort_ids, round_number, reason)
            return reason
        finally:
            with self._cond:
                self._session = None
                self._ckks = None
                self._attempt = None
            if split is not None:
                split.end()
        if self._stop.is_set():
            return None
        self.model.apply_sum(released)
        path, adapter = self.model.save(
            self.checkpoint_dir,
            round_number,
            server_part=None if split is None else split.vector(),
        )
        self._store.complete_round(attempt, contributors, path.name)
        self.run_record.round(
            config, contributors, server_record, time.monotonic() - began, adapter
        )
        pruned = prune_checkpoints(self.checkpoint_dir, self._config.keep_checkpoints)
        if pruned:
            log.info("removed checkpoints of rounds %s (keep_checkpoints)", _ids_text(pruned))
        dropped = sorted(set(config.cohort) - set(contributors))
        log.info(
            "round %d completed in %.1f s: %d contributors %s, %s, checkpoint %s",
            round_number,
            time.monotonic() - began,
            len(contributors),
            _ids_text(contributors),
            f"dropped {_ids_text(dropped)}" if dropped else "none dropped",
            path.name,
        )
        final = round_number + 1 >= self._config.rounds.rounds
        self._broadcast_end(RoundEnd(round_number, completed=True, final=final), config.cohort)
        return True

    # --- split training ---------------------------------------------------------------------

    def _split_then(
        self,
        attempt: int,
        split: SplitService,
        drive: Callable[[], Released],
    ) -> Released:
        """Serve every institution's split steps in turn, then aggregate their client parts
        (the backend's first deadline starts after the last turn)."""
        began = time.monotonic()
        phase = split.run_turns(self._stop)
        expected = len(phase.finished) + len(phase.dropped)
        self._store.record_stage(
            attempt,
            "split_steps",
            expected,
            len(phase.finished),
            bool(phase.dropped),
            time.monotonic() - began,
        )
        self._log_stage("split_steps", expected, sorted(phase.dropped))
        with self._cond:
            # A client dropped from the steps will not upload (it hung, died or left): the
            # secure sum stops waiting for it, as for a client that refused the round.
            for client, reason in sorted(phase.dropped.items()):
                if self._session is not None:
                    self._session.withdraw(client)
                if self._ckks is not None:
                    self._ckks.withdraw(client)
                self._store.record_refusal(attempt, client, f"split steps: {reason}")
            self._cond.notify_all()
        if self._stop.is_set():
            raise ProtocolAbort("server shutting down")
        if not phase.finished:
            raise TooFewSurvivors("no institution completed its split steps")
        return drive()

    # --- masking ----------------------------------------------------------------------------

    def _drive_masking(self, attempt: int, config: RoundConfig, session: ServerSession) -> Released:
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
        return self.model.decode(config, result), result.contributors, session.transcript

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
                SecAggMessage(session_id), encode_message(message)
            )

    # --- ckks -------------------------------------------------------------------------------

    def _drive_ckks(self, attempt: int, ckks: HeServerSession) -> Released:
        rounds = self._config.rounds
        began = time.monotonic()
        with self._cond:
            self._wait_while(lambda: ckks.pending, began + rounds.join_timeout_s, None)
            missing = sorted(ckks.pending)
            try:
                # TooFewSurvivors / NoDecryptor (ProtocolAbort): the attempt ends, nothing out.
                aggregate = ckks.close_uploads()
            finally:
                self._store.record_stage(
                    attempt,
                    HeStage.UPLOAD.value,
                    len(ckks.cohort),
                    len(ckks.contributors),
                    bool(missing),
                    time.monotonic() - began,
                )
        self._log_stage(HeStage.UPLOAD.value, len(ckks.cohort), missing)
        decryptor = ckks.decryptor
        log.info("asking client %d to decrypt the sum of %s", decryptor, list(ckks.contributors))
        self._mailboxes.of(decryptor).push(HeAggregate(ckks.session_id), aggregate)
        began = time.monotonic()
        with self._cond:
            self._wait_while(lambda: ckks.pending, began + rounds.stage_timeout_s, ckks.abort)
            done = ckks.stage is HeStage.DONE
            self._store.record_stage(
                attempt,
                f"{HeStage.DECRYPT.value}:{decryptor}",
                1,
                int(done),
                not done,
                time.monotonic() - began,
            )
            if ckks.stage is HeStage.ABORTED:
                raise NoDecryptor(
                    f"decryptor {decryptor}'s release was refused: {ckks.abort_reason}"
                )
            if not done:
                ckks.abort("the decryptor missed its deadline")
                raise NoDecryptor(f"decryptor {decryptor} missed its deadline; nothing is released")
        released = ckks.result
        agg = AggregateInput(
            released.total.astype(np.float64), released.weight, released.contributors
        )
        record = CkksRoundRecord(
            session_id=ckks.session_id,
            fingerprint=ckks.spec.fingerprint,
            cohort=tuple(sorted(ckks.cohort)),
            threshold=ckks.params.min_contributors,
            uploads=tuple(self._ckks_uploads[u] for u in sorted(self._ckks_uploads)),
            contributors=ckks.contributors,
            decryptor=decryptor,
        )
        return agg, ckks.contributors, record

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
            log.warning("stage %s closed at its deadline without %s", stage, _ids_text(missing))
        else:
            log.info("stage %s complete (%d clients)", stage, expected)

    def _end_attempt(
        self, attempt: int, cohort: tuple[int, ...], round_number: int, reason: str
    ) -> None:
        self._store.abort_round(attempt, reason)
        log.warning(
            "round %d attempt %d aborted, nothing released: %s", round_number, attempt, reason
        )
        self._broadcast_end(RoundEnd(round_number, reason=reason), cohort)

    def _broadcast_end(self, end: RoundEnd, cohort: tuple[int, ...]) -> None:
        recipients = (
            set(cohort) | set(self._mailboxes.online(ONLINE_WITHIN_S)) if end.final else set(cohort)
        )
        for client_id in sorted(recipients):
            self._mailboxes.of(client_id).push(end)

"""The network side of an institution: connect, prove identity, follow rounds, reconnect.

The protocol itself is :class:`secagg.protocol.ClientSession`; this module only moves its
messages. A round begins with a ``RoundStart`` item: the client builds the session from the
round config *and the exact bytes it received* (config + global model) as the context it signs,
so a server that shows different clients different models or configs is caught by the
consistency check. Every later item is a canonical secure-aggregation message, answered by the
session. Any :class:`ProtocolAbort` ends this client's part in the round (fail closed); the
client then waits for the next round.

Backends: a round's config names its backend and the client refuses one it is not configured
for (``[client] backend``) before computing or uploading anything. Under ckks the round is a
:class:`secagg.he.HeClientSession` built from the config at the edge, with the same
:class:`ClientPolicy` (min cohort, release floor) and, as its view, the exact config and model
bytes received: it encrypts the update (``HE_UPDATE``) and, if this client is the round's
decryptor and an ``HeAggregate`` item arrives, opens the aggregate only if it is the sum of the
claimed contributors' fresh uploads of this session (otherwise nothing is released and the
client leaves the round) and uploads the release (``HE_DECRYPTED_SUM``). A client takes part in
a ckks session id once.

Failure handling: ``UNAVAILABLE``/``DEADLINE_EXCEEDED`` -> reconnect with capped exponential
backoff and jitter, keeping the token and poll position (a network blip loses nothing);
``UNAUTHENTICATED`` (the server restarted, or the token was superseded) -> authenticate again,
drop any in-flight session and continue from the server's current position. The client gives up
after ``give_up_after_s`` without progress.

Server identity: TLS verifies the certificate against ``ca_cert``. The admission signature
additionally binds the SHA-256 of the server certificate, obtained from a TLS handshake to the
same address with the same trust anchors and host name check (grpc-python does not expose the
peer certificate of a channel, hence the separate handshake).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from clients.client_config import ClientConfig
from clients.privacy_ledger import PrivacyLedger
from fl_core.errors import FLError
from fl_core.round import RoundCodec, RoundPlan
from fl_core.round_config import RandomTask, RoundConfig, SplitTask, TrainTask
from fl_core.toml_config import ConfigError
from secagg.errors import MessageFormatError, PolicyViolation, ProtocolAbort, SecAggError
from secagg.messages import SERVER_MESSAGE_TYPES, MaskedInput, decode_message, encode_message
from secagg.protocol import ClientSession
from secagg.ring import Ring, RingArray
from wire import fedsec_pb2 as pb
from wire import fedsec_pb2_grpc as pb_grpc
from wire.convert import (
    MAX_MODEL_DIM,
    REFUSAL_MAX_BYTES,
    admission_signed_bytes,
    backend_name,
    download_limit,
    kind_of,
    round_config_from_pb,
)
from wire.framing import client_frames, grpc_options, read_item

if TYPE_CHECKING:
    from clients.train_task import LocalTrainer
    from clients.trainer import LocalResult
    from secagg.he import HeClientSession

log = logging.getLogger("fedsec.client")

POLL_WAIT_MS = 5_000
#: Deadline of one RPC beyond the server's long-poll wait (covers a large download).
RPC_SLACK_S = 60.0
_STAGE_OF_KIND: dict[int, str] = {
    pb.SEED_COMMIT: "seed_commit",
    pb.ADVERTISE_KEYS: "advertise_keys",
    pb.SHARE_KEYS: "share_keys",
    pb.MASKED_INPUT: "masked_input",
    pb.CONSISTENCY_SIGNATURE: "consistency_check",
    pb.UNMASK_RESPONSE: "unmask",
    pb.HE_UPDATE: "he_upload",
    pb.HE_DECRYPTED_SUM: "he_decrypt",
}
_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
#: How long another process of this institution may hold the connection before we give up.
DUPLICATE_GRACE_S = 60.0


class GiveUp(Exception):
    """The server stayed unreachable (or kept refusing us) for longer than configured."""


def _random_seed(config: RoundConfig) -> int:
    if not isinstance(config.task, RandomTask):
        raise ConfigError(f"round {config.round_number} is not a random round")
    return config.task.seed


def random_input(config: RoundConfig, client_id: int) -> RingArray:
    """The plain ``random`` task's update: integers uniform in the range of an encoded, clipped
    update, drawn from (seed, round, client id). Public test data (a load test or drill), so
    numpy's generator is fine here; it is reproducible so tests can compute the exact sum."""
    codec = config.masking.codec
    if codec.quant is None:
        raise ConfigError(f"round {config.round_number} encodes with DP, not quantisation")
    quant = codec.quant
    bound = int(np.floor(quant.scale * quant.clip))
    rng = np.random.default_rng([_random_seed(config), config.round_number, client_id])
    values = rng.integers(-bound, bound + 1, size=codec.encoded_dim, dtype=np.int64)
    return Ring(quant.ring_bits).from_signed(values)


def random_update(config: RoundConfig, client_id: int) -> np.ndarray:
    """The ``random`` task's float update (ckks, or masking with DP): uniform in [-clip, clip]
    drawn from (seed, round, client id); public test data, reproducible so tests know the sum."""
    rng = np.random.default_rng([_random_seed(config), config.round_number, client_id])
    clip = config.clip
    return rng.uniform(-clip, clip, size=config.contribution_size).astype(np.float32)


@dataclass
class _Round:
    config: RoundConfig
    #: The masking protocol session (masking rounds only).
    session: ClientSession | None = None
    #: The CKKS client session (ckks rounds only).
    he: HeClientSession | None = None
    #: The masking round's plan: what the privacy ledger charges when the input leaves.
    plan: RoundPlan | None = None


@dataclass
class TransportStats:
    rounds_completed: int = 0
    rounds_aborted: int = 0
    #: Rounds this client refused before computing anything (also counted as aborted).
    rounds_refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    #: Of those, split training's step streams (activations, gradients and their framing).
    split_bytes_up: int = 0
    split_bytes_down: int = 0
    split_steps: int = 0

    def as_json(self, client_id: int) -> str:
        return json.dumps({"client_id": client_id, **self.__dict__})


class AdmissionRpcError(Exception):
    """Challenge or Authenticate failed; ``code`` says whether retrying can help."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ClientTransport:
    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._policy = config.policy
        privacy = config.privacy
        self._ledger = PrivacyLedger.load(
            privacy.ledger, privacy.max_epsilon, privacy.require_dp, privacy.delta
        )
        self._channel: Any = None
        self._stub: Any = None
        self._token = b""
        self._seq = 0
        self._round: _Round | None = None
        self._trainer: LocalTrainer | None = None
        #: CKKS session ids this client took part in: a replayed RoundStart is refused.
        self._ckks_sessions: set[bytes] = set()
        # Tells the server this process from another one of the same institution.
        self._instance = secrets.token_bytes(16)
        self.stats = TransportStats()
        #: Set when the server ended the federation early (it gave up on a round).
        self.stopped_because: str | None = None
        self._last_refusal: str | None = None

    # --- connection -------------------------------------------------------------------------

    def _target_name(self) -> str:
        return self._config.server_name or self._config.server.rsplit(":", 1)[0]

    def _server_cert_sha256(self) -> bytes:
        host, port = self._config.server.rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(self._config.ca_cert))
        context.set_alpn_protocols(["h2"])
        if self._config.tls_cert and self._config.tls_key:
            context.load_cert_chain(str(self._config.tls_cert), str(self._config.tls_key))
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=self._target_name()) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            if self._config.tls_cert is not None:
                # TLS 1.3 finishes the client's side of the handshake before the server has
                # checked our certificate; its verdict (an alert, or its first HTTP/2 frame)
                # is the first thing it sends.
                tls.settimeout(5)
                with contextlib.suppress(TimeoutError):
                    if not tls.recv(1):
                        raise ssl.SSLError(
                            "the server closed the connection after the handshake: it does not "
                            f"accept our client certificate {self._config.tls_cert}"
                        )
        if der is None:
            raise ssl.SSLError("server presented no certificate")
        return hashlib.sha256(der).digest()

    def _connect(self) -> None:
        if self._channel is not None:
            self._channel.close()
        options: list[tuple[str, Any]] = list(grpc_options())
        # gRPC's own reconnect backoff (up to 120 s by default) must not outlast ours.
        options += [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(1000 * self._config.reconnect_max_s)),
        ]
        if self._config.server_name:
            options.append(("grpc.ssl_target_name_override", self._config.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._config.ca_cert.read_bytes(),
            private_key=self._config.tls_key.read_bytes() if self._config.tls_key else None,
            certificate_chain=self._config.tls_cert.read_bytes() if self._config.tls_cert else None,
        )
        self._channel = grpc.secure_channel(self._config.server, credentials, options=options)
        stub: Any = pb_grpc.CoordinatorStub  # generated, untyped
        self._stub = stub(self._channel)

    def _authenticate(self) -> None:
        client_id = self._config.client_id
        cert_hash = self._server_cert_sha256()
        try:
            nonce = self._stub.Challenge(pb.ChallengeRequest(client_id=client_id), timeout=30).nonce
            signature = self._config.identity.sign(
                admission_signed_bytes(nonce, cert_hash, client_id)
            )
            reply = self._stub.Authenticate(
                pb.AuthenticateRequest(
                    client_id=client_id,
                    nonce=nonce,
                    server_cert_sha256=cert_hash,
                    signature=signature,
                    instance=self._instance,
                ),
                timeout=30,
            )
        except grpc.RpcError as exc:
            raise AdmissionRpcError(exc.code(), exc.details()) from None
        self._token, self._seq = reply.token, reply.next_seq
        if self._round is not None:
            log.warning("re-admitted: the round in flight is lost to this client")
            self._drop_round(aborted=True)
        log.info("client %d admitted; polling from item %d", client_id, self._seq)

    # --- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Follow rounds until the server says the federation is over; returns an exit code.

        Permanent refusals end the process with one error line and exit status 1: admission
        refused (not in the roster, a key the roster does not list, a signature for another
        certificate), a server certificate that does not verify against ``ca_cert`` (wrong CA,
        expired, wrong host name) or a TLS handshake the server refuses (mutual TLS without an
        accepted client certificate), another process of this institution connected for longer
        than :data:`DUPLICATE_GRACE_S`. Outages are retried with a backoff that restarts as
        soon as the server answers again.
        """
        backoff = 0.2
        last_progress = time.monotonic()
        duplicate_since: float | None = None
        need_auth = True
        self._connect()
        while True:
            try:
                if need_auth:
                    self._authenticate()
                    need_auth, duplicate_since = False, None
                if self._poll_once():
                    return self._exit_status()
                backoff, last_progress = 0.2, time.monotonic()
                continue
            except AdmissionRpcError as exc:
                code = exc.code
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    log.error("admission refused by the server: %s", exc.details)
                    return 1
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    duplicate_since = duplicate_since or time.monotonic()
                    if time.monotonic() - duplicate_since > DUPLICATE_GRACE_S:
                        log.error("%s; giving up", exc.details)
                        return 1
                    log.warning("%s; retrying", exc.details)
                elif code in _RETRY:
                    log.warning("server unreachable (%s: %s); retrying", code.name, exc.details)
                else:
                    log.warning("admission failed (%s: %s); retrying", code.name, exc.details)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    log.warning("server no longer knows our token (%s)", exc.details())
                    need_auth = True
                elif code in _RETRY:
                    log.warning("server unreachable (%s: %s); retrying", code.name, exc.details())
                else:
                    log.error("refused by the server: %s: %s", code.name, exc.details())
                    need_auth = True
            except ssl.SSLCertVerificationError as exc:
                log.error(
                    "the server's certificate does not verify against %s: %s",
                    self._config.ca_cert,
                    exc.verify_message or exc.reason,
                )
                return 1
            except ssl.SSLError as exc:
                log.error(
                    "the server refused our TLS handshake: %s", getattr(exc, "reason", None) or exc
                )
                return 1
            except OSError as exc:
                log.warning("cannot reach the server: %s", exc.strerror or exc)
            except MessageFormatError as exc:
                # An item we cannot read (e.g. larger than we accept): leave any round in
                # flight and start again from the end of our queue after re-admission.
                log.error("unreadable item from the server, skipping our queue: %s", exc)
                self._drop_round(aborted=True)
                need_auth = True
            if time.monotonic() - last_progress > self._config.give_up_after_s:
                log.error("no progress for %.0f s; giving up", self._config.give_up_after_s)
                return 1
            delay = min(backoff, self._config.reconnect_max_s) * random.uniform(0.5, 1.0)
            self._wait_for_server(delay)
            backoff *= 2

    def _exit_status(self) -> int:
        """0 when the federation completed and this client took part in it; 1 when the server
        stopped it early, or when this client refused every round it was offered (its policy
        and the server's parameters disagree: the operator must hear of it, not read exit 0)."""
        if self.stopped_because is not None:
            return 1
        if self.stats.rounds_completed == 0 and self.stats.rounds_refused > 0:
            log.error(
                "the federation ended without this client: it refused all %d rounds it was "
                "offered; last reason: %s",
                self.stats.rounds_refused,
                self._last_refusal,
            )
            return 1
        return 0

    def _wait_for_server(self, at_most_s: float) -> None:
        """Sleep until the channel connects or ``at_most_s`` passes: a server back from a
        restart is used at once, not after the full backoff."""
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(self._channel).result(timeout=at_most_s)

    def _limit_for(self, item: pb.ServerItem) -> int:
        kind = item.WhichOneof("kind")
        if kind == "round_start":
            config: pb.RoundConfig = pb.RoundConfig.FromString(item.round_start.config)
            if config.model_dim > MAX_MODEL_DIM:
                return 0  # refused by the size check: larger than any model we accept
            # The global vector, and SCAFFOLD's server control variate of the same length.
            vectors = (
                2 if config.WhichOneof("task") == "train" and config.train.server_control else 1
            )
            return 4 * config.model_dim * vectors
        if kind == "secagg" and self._round is not None:
            return download_limit(len(self._round.config.cohort))
        if kind == "he_aggregate" and self._round is not None and self._round.he is not None:
            from wire.he_round import aggregate_download_limit

            return aggregate_download_limit(
                self._round.he.params, self._round.config.contribution_size
            )
        return 0

    def _poll_once(self) -> bool:
        frames: Iterator[pb.ServerFrame] = self._stub.Poll(
            pb.PollRequest(token=self._token, seq=self._seq, wait_ms=POLL_WAIT_MS),
            timeout=POLL_WAIT_MS / 1000 + RPC_SLACK_S,
        )
        counted = self._count_down(frames)
        item, payload = read_item(counted, self._limit_for)
        kind = item.WhichOneof("kind")
        if kind == "idle":
            return False
        self._seq = item.seq + 1
        if kind == "round_start":
            self._start_round(item.round_start.config, payload)
        elif kind == "secagg":
            self._on_secagg(item.secagg.session_id, payload)
        elif kind == "he_aggregate":
            self._on_he_aggregate(item.he_aggregate.session_id, payload)
        elif kind == "round_end":
            return self._on_round_end(item.round_end)
        return False

    def _count_down(self, frames: Iterator[pb.ServerFrame]) -> Iterator[pb.ServerFrame]:
        for frame in frames:
            self.stats.bytes_down += frame.ByteSize()
            yield frame

    # --- rounds -----------------------------------------------------------------------------

    def _start_round(self, config_bytes: bytes, model: bytes) -> None:
        if self._round is not None:
            self._drop_round(aborted=True)
        message: pb.RoundConfig = pb.RoundConfig.FromString(config_bytes)
        where = (message.round_number, message.session_id)
        backend = backend_name(message)
        if backend != self._config.backend:
            self._refuse(
                *where,
                f"it uses the {backend} backend, this client is configured for "
                f"{self._config.backend}",
            )
            return
        try:
            # The edge: past here the round is a domain object. What the session signs is
            # still the bytes received (config_bytes), never a re-encoding of the conversion.
            config = round_config_from_pb(message)
            if config.backend == "ckks":
                self._start_ckks_round(config, config_bytes, model)
            else:
                self._start_masking_round(config, config_bytes, model)
        except (SecAggError, FLError, ConfigError) as exc:
            self._round = None
            self._refuse(*where, f"{type(exc).__name__}: {exc}")

    def _refuse(self, round_number: int, session_id: bytes, reason: str) -> None:
        """Leave the round before computing anything, and tell the server why."""
        log.error("round %d refused: %s", round_number, reason)
        self.stats.rounds_aborted += 1
        self.stats.rounds_refused += 1
        self._last_refusal = reason
        self._tell_server(round_number, session_id, reason)

    def _tell_server(self, round_number: int, session_id: bytes, reason: str) -> None:
        """Best effort: the server logs and records why this institution left the round, and
        stops waiting for it. Nothing secret is in a reason (they name parameters and checks)."""
        if self._stub is None:
            return  # not connected (a transport driven in-process)
        header = pb.SubmitHeader(
            token=self._token,
            round_number=round_number,
            session_id=session_id,
            kind=pb.ROUND_REFUSAL,
        )
        payload = reason.encode("utf-8")[:REFUSAL_MAX_BYTES]
        try:
            self._stub.Submit(iter(list(client_frames(header, payload))), timeout=RPC_SLACK_S)
        except grpc.RpcError as exc:
            log.warning("could not tell the server why: %s: %s", exc.code().name, exc.details())

    def _start_masking_round(self, config: RoundConfig, config_bytes: bytes, model: bytes) -> None:
        plan = config.plan()
        params = plan.secagg_params()
        # Refuse before spending time on training: the session parameters, and the DP noise
        # against this institution's own privacy budget.
        self._policy.check(params)
        self._ledger.check(plan, self._config.client_id)
        encoded = self._input(config, model, plan.codec)
        session = ClientSession(
            self._config.client_id,
            self._config.identity,
            self._config.roster,
            params,
            encoded,
            context=plan.client_context(config_bytes + model),
            policy=self._policy,
        )
        self._log_round(config)
        self._round = _Round(config, session=session, plan=plan)
        start = session.start()
        self._send(kind_of(start), encode_message(start))

    def _start_ckks_round(self, config: RoundConfig, config_bytes: bytes, model: bytes) -> None:
        from secagg.he import HeClientSession
        from wire.he_round import ckks_spec_of

        held = self._config.ckks_secret
        if held is None:
            raise ConfigError("this client has no [ckks] secret_context loaded")
        if config.session_id in self._ckks_sessions:
            raise PolicyViolation(
                f"session {config.session_id[:8].hex()} was already run: a client takes part in "
                "a ckks session once"
            )
        spec = ckks_spec_of(config)
        # Policy (cohort size, release floor, membership) and the federation key are checked
        # here, before training; the session's view binds the exact config and model received.
        session = HeClientSession(
            self._config.client_id,
            held.for_round(spec.params),
            spec,
            context=config_bytes + model,
            policy=self._policy,
        )
        self._ckks_sessions.add(config.session_id)
        update, weight = self._float_update(config, model)
        self._log_round(config)
        self._round = _Round(config, he=session)
        self._send(pb.HE_UPDATE, session.encrypt(update, weight))

    def _log_round(self, config: RoundConfig) -> None:
        log.info(
            "round %d (%s): session %s, cohort of %d",
            config.round_number,
            config.backend,
            config.session_id[:8].hex(),
            len(config.cohort),
        )

    def _float_update(self, config: RoundConfig, model: bytes) -> tuple[np.ndarray, int]:
        """The round core's client step: the float contribution and its weight (1 for
        ``random``), what the ckks session encrypts or the masking codec encodes."""
        task = config.task
        if isinstance(task, RandomTask):
            return random_update(config, self._config.client_id), 1
        if isinstance(task, TrainTask):
            return self._local_trainer().contribution(config, task, model)
        from clients.train_task import contribution_of

        result = self._split_update(config, task, model)
        return contribution_of(config, result, result.delta.size)

    def _split_update(self, config: RoundConfig, task: SplitTask, model: bytes) -> LocalResult:
        """Split training: this institution's steps through the round's ``SplitSteps`` stream,
        then the update of its client part (what goes into the secure sum)."""
        from clients.split.train_task import split_model_for, split_update
        from clients.split.transport import GrpcSplitLink

        trainer = self._local_trainer()
        split_model_for(trainer, task, model)  # refuse before opening a stream
        stall = self._config.stall_before == "split_gradient" and (
            self._config.stall_round in (None, config.round_number)
        )
        link = GrpcSplitLink(self._stub, self._token, config, self._config.client_id, stall)
        try:
            result = split_update(trainer, task, model, link)
        finally:
            link.close()
            self.stats.bytes_up += link.bytes_up
            self.stats.bytes_down += link.bytes_down
            self.stats.split_bytes_up += link.bytes_up
            self.stats.split_bytes_down += link.bytes_down
        self.stats.split_steps += result.steps
        return result

    def _local_trainer(self) -> LocalTrainer:
        if self._trainer is None:
            # Imported here: torch and transformers load only on clients that train.
            from clients.train_task import LocalTrainer

            self._trainer = LocalTrainer(self._config)
        return self._trainer

    def _input(self, config: RoundConfig, model: bytes, codec: RoundCodec) -> RingArray:
        """The masking session's input: the contribution through the round's codec. (Plain
        ``random`` rounds send pre-quantized integers, so tests know their sum exactly.)"""
        if isinstance(config.task, RandomTask) and codec.dp is None:
            return random_input(config, self._config.client_id)
        unit, weight = self._float_update(config, model)
        return codec.encode(unit, weight).vector

    def _on_secagg(self, session_id: bytes, payload: bytes) -> None:
        current = self._round
        if current is None or session_id != current.config.session_id:
            log.info("ignoring a message for session %s (not ours now)", session_id[:8].hex())
            return
        try:
            if current.session is None:
                raise ProtocolAbort("the server sent a masking message in a ckks round")
            message = decode_message(payload)
            if not isinstance(message, SERVER_MESSAGE_TYPES):
                raise ProtocolAbort(f"the server sent a {type(message).__name__}")
            reply = current.session.handle(message)
        except SecAggError as exc:
            log.error("round %d: leaving the session: %s", current.config.round_number, exc)
            self._drop_round(aborted=True)
            self._tell_server(
                current.config.round_number,
                current.config.session_id,
                f"left the session: {type(exc).__name__}: {exc}",
            )
            return
        if isinstance(reply, MaskedInput) and current.plan is not None:
            # Charged when the noised input leaves, before it is sent: from then on the server
            # may release a sum containing it without any further help from this client.
            self._ledger.charge(current.plan, current.config.session_id)
        self._send(kind_of(reply), encode_message(reply))

    def _on_he_aggregate(self, session_id: bytes, payload: bytes) -> None:
        from wire.he_round import encode_release

        current = self._round
        if current is None or session_id != current.config.session_id:
            log.info("ignoring an aggregate for session %s (not ours now)", session_id[:8].hex())
            return
        try:
            if current.he is None:
                raise ProtocolAbort("the server sent a ckks aggregate in a masking round")
            released = current.he.decrypt(payload)
        except SecAggError as exc:
            log.error("round %d: refusing to decrypt: %s", current.config.round_number, exc)
            self._drop_round(aborted=True)
            self._tell_server(
                current.config.round_number,
                current.config.session_id,
                f"refused to decrypt: {type(exc).__name__}: {exc}",
            )
            return
        log.info(
            "round %d: decrypted the sum of %d contributors",
            current.config.round_number,
            released.contributors,
        )
        self._send(pb.HE_DECRYPTED_SUM, encode_release(session_id, released))

    def _on_round_end(self, end: pb.RoundEnd) -> bool:
        if end.completed:
            without = "" if self._round is not None else " without this client"
            log.info("round %d completed%s", end.round_number, without)
            self._drop_round(aborted=False)
        elif end.final:
            log.error("the server stopped the federation: %s", end.reason)
            self.stopped_because = end.reason
            self._drop_round(aborted=True)
        else:
            log.warning("round %d aborted by the server: %s", end.round_number, end.reason)
            self._drop_round(aborted=True)
        return bool(end.final)

    def _drop_round(self, aborted: bool) -> None:
        if self._round is None:
            return
        if aborted:
            self.stats.rounds_aborted += 1
        else:
            self.stats.rounds_completed += 1
        self._round = None

    def _send(self, kind: pb.MessageKind, payload: bytes) -> None:
        current = self._round
        if current is None:
            return
        stall_round = self._config.stall_round
        if self._config.stall_before == _STAGE_OF_KIND[kind] and (
            stall_round is None or stall_round == current.config.round_number
        ):
            log.warning("fault injection: stalling before %s", _STAGE_OF_KIND[kind])
            while True:
                time.sleep(3600)
        header = pb.SubmitHeader(
            token=self._token,
            round_number=current.config.round_number,
            session_id=current.config.session_id,
            kind=kind,
        )
        frames = list(client_frames(header, payload))
        self.stats.bytes_up += sum(f.ByteSize() for f in frames)
        try:
            self._stub.Submit(iter(frames), timeout=RPC_SLACK_S)
        except grpc.RpcError as exc:
            if exc.code() in _RETRY or exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            # Late for the stage, or refused: the server goes on without us this round.
            log.warning(
                "%s refused: %s: %s", pb.MessageKind.Name(kind), exc.code().name, exc.details()
            )

"""The gRPC face of the coordinator: admission, long-poll downloads, chunked uploads, TLS.

Every refusal ends the call with a specific gRPC status and a log line naming the client (when
known) and the reason; the server keeps serving everyone else. The message-size limits of the
gRPC server are pinned to one frame (:func:`wire.framing.grpc_options`): anything
larger arrives in chunks whose total was declared and checked first.

Protobuf stops here: a polled outbox item (:mod:`server.outbox`) becomes a ``ServerItem`` with
its sequence number, and an upload's ``SubmitHeader`` becomes the round loop's
:class:`~server.rounds.UploadHeader` before the loop sees it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from concurrent import futures
from typing import Any, assert_never

import grpc

from fl_core.cli import UsageError
from secagg.protocol import SumBackend
from server.admission import Admission, Refusal
from server.config import ServerConfig
from server.outbox import HeAggregate, Mailboxes, Queued, RoundEnd, RoundStart, SecAggMessage
from server.rounds import RoundRunner, UploadHeader
from server.store import Store
from wire import fedsec_pb2 as pb
from wire import fedsec_pb2_grpc as pb_grpc
from wire.credentials import cert_sha256
from wire.framing import (
    PayloadTooLarge,
    WireFormatError,
    grpc_options,
    read_upload,
    server_frames,
)

log = logging.getLogger("fedsec.server")


class ListenError(UsageError):
    """The configured address cannot be bound (printed as one line by the CLI)."""


#: Longest a Poll may wait for an item before returning Idle.
MAX_POLL_WAIT_MS = 10_000


def _peer(context: Any) -> str:
    return str(context.peer())


def server_item_to_pb(queued: Queued) -> pb.ServerItem:
    """What a poll sends for a queued item (its payload follows in chunk frames)."""
    item, seq = queued.item, queued.seq
    if isinstance(item, RoundStart):
        return pb.ServerItem(seq=seq, round_start=pb.RoundStart(config=item.config))
    if isinstance(item, SecAggMessage):
        return pb.ServerItem(seq=seq, secagg=pb.SecAggItem(session_id=item.session_id))
    if isinstance(item, HeAggregate):
        return pb.ServerItem(seq=seq, he_aggregate=pb.HeAggregate(session_id=item.session_id))
    if isinstance(item, RoundEnd):
        end = pb.RoundEnd(
            round_number=item.round_number,
            completed=item.completed,
            reason=item.reason,
            final=item.final,
        )
        return pb.ServerItem(seq=seq, round_end=end)
    assert_never(item)


def upload_header_from_pb(header: pb.SubmitHeader) -> UploadHeader:
    """What an upload declares, without its token (the caller has authenticated it). The kind
    is kept as received, known or not: the round loop refuses one it does not know."""
    return UploadHeader(
        round_number=header.round_number,
        session_id=header.session_id,
        kind=int(header.kind),
    )


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        config: ServerConfig,
        admission: Admission,
        mailboxes: Mailboxes,
        runner: RoundRunner,
        store: Store,
    ) -> None:
        self._config = config
        self._admission = admission
        self._mailboxes = mailboxes
        self._runner = runner
        self._store = store

    def _refuse(self, context: Any, rpc: str, client: int | None, refusal: Refusal) -> None:
        who = f"client {client}" if client is not None else _peer(context)
        log.warning("%s refused for %s: %s: %s", rpc, who, refusal.code.name, refusal)
        context.abort(refusal.code, str(refusal))

    def Challenge(self, request: pb.ChallengeRequest, context: Any) -> pb.ChallengeReply:
        try:
            return pb.ChallengeReply(nonce=self._admission.challenge(request.client_id))
        except Refusal as refusal:
            self._refuse(context, "Challenge", request.client_id, refusal)
            raise

    def Authenticate(self, request: pb.AuthenticateRequest, context: Any) -> pb.AuthenticateReply:
        try:
            token = self._admission.authenticate(
                request.client_id,
                request.nonce,
                request.server_cert_sha256,
                request.signature,
                request.instance,
                polling=self._mailboxes.of(request.client_id).polling > 0,
            )
        except Refusal as refusal:
            self._refuse(context, "Authenticate", request.client_id, refusal)
            raise
        client_id = request.client_id
        self._store.seen(client_id, self._config.names.get(client_id, f"client-{client_id}"))
        log.info("client %d admitted from %s", client_id, _peer(context))
        return pb.AuthenticateReply(token=token, next_seq=self._mailboxes.of(client_id).restart())

    def Poll(self, request: pb.PollRequest, context: Any) -> Iterator[pb.ServerFrame]:
        try:
            client_id = self._admission.client_of(request.token)
        except Refusal as refusal:
            self._refuse(context, "Poll", None, refusal)
            raise
        wait_s = min(request.wait_ms, MAX_POLL_WAIT_MS) / 1000.0
        queued = self._mailboxes.of(client_id).get(request.seq, wait_s, context.is_active)
        if queued is None:
            yield pb.ServerFrame(item=pb.ServerItem(seq=request.seq, idle=pb.Idle()))
            return
        yield from server_frames(server_item_to_pb(queued), queued.payload)

    def SplitSteps(
        self, request_iterator: Iterator[pb.SplitUp], context: Any
    ) -> Iterator[pb.SplitDown]:
        client: int | None = None
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("body") != "open":
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, "a split stream starts with a SplitOpen"
                )
            client = self._admission.client_of(first.open.token)
            split = self._runner.split
            if split is None:
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    'this server does not run split training ([task] kind = "split")',
                )
            yield from split.serve(client, first.open, request_iterator, context)
        except Refusal as refusal:
            self._refuse(context, "SplitSteps", client, refusal)
            raise

    def Submit(self, request_iterator: Iterator[pb.ClientFrame], context: Any) -> pb.SubmitReply:
        client: list[int] = []
        declared: list[UploadHeader] = []

        def limit_for(header: pb.SubmitHeader) -> int:
            client.append(self._admission.client_of(header.token))
            declared.append(upload_header_from_pb(header))
            return self._runner.upload_limit(client[0], declared[0])

        try:
            _, payload = read_upload(request_iterator, limit_for)
            self._runner.deliver(client[0], declared[0], payload)
        except Refusal as refusal:
            failure = refusal
        except PayloadTooLarge as exc:
            failure = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except WireFormatError as exc:
            failure = Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        else:
            return pb.SubmitReply()
        self._refuse(context, "Submit", client[0] if client else None, failure)
        raise failure


def _check_bindable(listen: str) -> None:
    """Bind the address once ourselves, so a port in use or a foreign address is reported with
    the operating system's reason instead of gRPC's opaque "Failed to bind"."""
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {listen}: {exc.strerror} (server.listen)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC does: a port whose old connections linger in TIME_WAIT (a restarted server)
        # is free; one another process listens on is not (no SO_REUSEPORT on either side).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {listen}: {exc.strerror} (server.listen)"
            ) from None


def build_server(
    config: ServerConfig, store: Store, sum_backend: SumBackend | None = None
) -> tuple[Any, RoundRunner, int]:
    """A started gRPC server (TLS), its round runner (not yet running) and the bound port.

    ``sum_backend`` does the masking rounds' O(d) work (the caller owns its lifetime)."""
    cert_pem = config.tls.cert.read_bytes()
    credentials = grpc.ssl_server_credentials(
        [(config.tls.key.read_bytes(), cert_pem)],
        root_certificates=config.tls.client_ca.read_bytes() if config.tls.client_ca else None,
        require_client_auth=config.tls.client_ca is not None,
    )
    mailboxes = Mailboxes()
    runner = RoundRunner(config, store, mailboxes, sum_backend)
    admission = Admission(config.roster, cert_sha256(cert_pem))
    # Long polls hold a worker each: one per institution plus room for concurrent uploads.
    workers = 2 * len(config.roster) + 16
    # No SO_REUSEPORT: a second server on a port another one holds must fail, not silently
    # share it (institutions would split between the two and both wait forever).
    options = [*grpc_options(), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    register: Any = pb_grpc.add_CoordinatorServicer_to_server  # generated, untyped
    register(CoordinatorService(config, admission, mailboxes, runner, store), server)
    _check_bindable(config.listen)
    try:
        port = server.add_secure_port(config.listen, credentials)
    except RuntimeError:
        port = 0  # grpcio raises "Failed to bind" where older versions returned 0
    if port == 0:
        raise ListenError(f"cannot listen on {config.listen} (server.listen)")
    server.start()
    return server, runner, port

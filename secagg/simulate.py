"""Run n clients and one server of a session in one process.

Every message goes through its canonical byte encoding in both directions, exactly as it would
over the network, so the byte counts are real and the codec is exercised. Dropouts can be
injected before any stage (a dropped client sends nothing from that stage on), and a hook can
rewrite server messages in flight, which is how the tests play a malicious server.

A client that aborts (it detected a violation) simply stops answering, as a real one would;
its reason is kept in :attr:`Simulation.client_aborts`. If the server ends up with too few
survivors, :meth:`Simulation.run` raises the server's :class:`ProtocolAbort` and no sum exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from secagg.errors import ConfigurationError, ProtocolAbort, SecAggError, UnexpectedMessage
from secagg.keys import Identity, Roster
from secagg.messages import ClientMessage, ServerMessage, decode_message, encode_message
from secagg.protocol import (
    AggregateResult,
    ClientPolicy,
    ClientSession,
    RoundParams,
    ServerSession,
    Stage,
    SumBackend,
)
from secagg.ring import RingArray
from secagg.transcript import Transcript

ServerHook = Callable[[ServerMessage], ServerMessage]


@dataclass
class SimulationResult:
    result: AggregateResult
    transcript: Transcript
    stage_seconds: dict[str, float]
    client_mask_seconds: dict[int, float]
    upload_bytes: dict[int, int]
    server_close_seconds: dict[str, float]  # server compute per stage (close_stage only)
    client_aborts: dict[int, str] = field(default_factory=dict)


def make_identities(cohort: Iterable[int]) -> tuple[dict[int, Identity], Roster]:
    identities = {u: Identity.generate() for u in cohort}
    return identities, Roster({u: i.public_bytes for u, i in identities.items()})


class Simulation:
    def __init__(
        self,
        params: RoundParams,
        inputs: Mapping[int, RingArray],
        *,
        dropouts: Mapping[Stage, Iterable[int]] | None = None,
        contexts: Mapping[int, bytes] | None = None,
        policy: ClientPolicy | None = None,
        server_hook: ServerHook | None = None,
        record_masked_inputs: bool = True,
        server_backend: SumBackend | None = None,
    ) -> None:
        missing = set(params.cohort) - set(inputs)
        if missing:
            raise ConfigurationError(f"no input for clients {sorted(missing)[:10]}")
        self.params = params
        self.identities, self.roster = make_identities(params.cohort)
        contexts = contexts or {}
        self.clients = {
            u: ClientSession(
                u,
                self.identities[u],
                self.roster,
                params,
                inputs[u],
                contexts.get(u, b""),
                policy,
            )
            for u in params.cohort
        }
        self.server = ServerSession(
            params, self.roster, record_masked_inputs, backend=server_backend
        )
        self.dropouts = {stage: frozenset(ids) for stage, ids in (dropouts or {}).items()}
        self.server_hook = server_hook
        self.client_aborts: dict[int, str] = {}
        self.upload_bytes = dict.fromkeys(params.cohort, 0)

    def run(self) -> SimulationResult:
        stage_seconds: dict[str, float] = {}
        server_close_seconds: dict[str, float] = {}
        dropped: set[int] = set()
        inbox: dict[int, bytes] = {}
        stages = self.params.stages
        for stage in stages:
            begin = time.perf_counter()
            dropped |= self.dropouts.get(stage, frozenset())
            for u, client in self.clients.items():
                if u in dropped or client.aborted:
                    continue
                reply: ClientMessage
                if stage is stages[0]:
                    reply = client.start()
                elif u in inbox:
                    try:
                        incoming = decode_message(inbox[u])
                        if not isinstance(incoming, ServerMessage):
                            raise UnexpectedMessage("a client message arrived at a client")
                        reply = client.handle(incoming)
                    except ProtocolAbort as exc:
                        self.client_aborts[u] = f"{type(exc).__name__}: {exc}"
                        continue
                else:
                    continue  # the server sent this client nothing: it is out of the round
                data = encode_message(reply)
                self.upload_bytes[u] += len(data)
                try:
                    self.server.receive(data)
                except SecAggError:
                    continue  # a bad message is discarded; the transcript records why
            closing = time.perf_counter()
            outgoing = self.server.close_stage()  # raises when too few survive
            server_close_seconds[stage.value] = time.perf_counter() - closing
            inbox = {}
            for msg in outgoing:
                if self.server_hook is not None:
                    msg = self.server_hook(msg)
                inbox[msg.recipient] = encode_message(msg)
            stage_seconds[stage.value] = time.perf_counter() - begin
        return SimulationResult(
            self.server.result,
            self.server.transcript,
            stage_seconds,
            {u: c.mask_seconds for u, c in self.clients.items() if c.mask_seconds},
            self.upload_bytes,
            server_close_seconds,
            self.client_aborts,
        )


def simulate_round(
    params: RoundParams,
    inputs: Mapping[int, RingArray],
    *,
    dropouts: Mapping[Stage, Iterable[int]] | None = None,
    policy: ClientPolicy | None = None,
    record_masked_inputs: bool = True,
) -> SimulationResult:
    """One honest session with the given dropouts; see :class:`Simulation` for the knobs."""
    return Simulation(
        params,
        inputs,
        dropouts=dropouts,
        policy=policy,
        record_masked_inputs=record_masked_inputs,
    ).run()

"""Measuring masking against the AES-CTR limit on a machine that other jobs share.

Timings taken minutes apart see different loads, so every comparison here is interleaved: the
quantity (A) and its AES-CTR limit (B) are measured one right after the other, alternating
which of the two goes first, and each is summarised by its median and spread over the repeats;
a ratio is the ratio of the medians. When the load changes during a run, the timings split
into modes and a median can fall between them; ``*_paired`` is then the steadier figure: the
median of the ratios of each A to the B right beside it. Thread CPU time
(``time.thread_time``) is reported beside wall time where all the work runs in this thread:
time other processes take from the core does not count in it, so it shows what the code costs,
while wall time shows what a user waits.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from secagg.messages import (
    ClientMessage,
    MaskedInput,
    ServerMessage,
    SharesDelivery,
    decode_message,
    encode_message,
)
from secagg.packing import add_packed, pack
from secagg.prg import raw_keystream_seconds
from secagg.protocol import ClientSession, ServerSession, Stage, SumBackend
from secagg.simulate import Simulation


def spread(values: Sequence[float], digits: int = 5) -> dict[str, float]:
    """Median, quartiles and range of ``values`` (at least one), and their count."""
    ordered = sorted(values)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    summary = {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
    }
    return {**{k: round(v, digits) for k, v in summary.items()}, "n": len(ordered)}


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """median(a) / median(b)."""
    return round(statistics.median(a) / statistics.median(b), 3)


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, thread CPU seconds) of ``work()``."""
    wall, cpu = time.perf_counter(), time.thread_time()
    work()
    return time.perf_counter() - wall, time.thread_time() - cpu


def random_keys(count: int) -> list[bytes]:
    """Keys for raw keystream timing (AES speed does not depend on the key)."""
    return [os.urandom(16) for _ in range(count)]


@dataclass
class PairedClients:
    """Pairs each sampled client's masking step with the raw AES-CTR of the same masks.

    A is the real protocol step, ``ClientSession.mask_seconds`` (the copy of x_u and every mask,
    timed inside ``ClientSession.handle``); B is :func:`secagg.prg.raw_keystream_seconds` of as
    many masks of the same length, taken right before or right after A (alternating between
    clients). Every ``every``-th client is sampled.
    """

    sim: Simulation
    every: int = 1
    mask_s: list[float] = field(default_factory=list)
    prg_s: list[float] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._keys = random_keys(len(self.sim.params.cohort))
        for i, client in enumerate(self.sim.clients.values()):
            if i % self.every == 0:
                raw_first = bool(i // self.every % 2)
                client.handle = self._paired(client, raw_first)  # type: ignore[method-assign,assignment]

    def _paired(
        self, client: ClientSession, raw_first: bool
    ) -> Callable[[ServerMessage], ClientMessage]:
        handle, params = client.handle, self.sim.params

        def raw(count: int) -> float:
            return raw_keystream_seconds(self._keys[:count], params.dim, params.ring)

        def paired(message: ServerMessage) -> ClientMessage:
            if not isinstance(message, SharesDelivery):
                return handle(message)
            count = len(message.ciphertexts) + 1  # the self mask and one per neighbour
            before = raw(count) if raw_first else None
            reply = handle(message)
            if isinstance(reply, MaskedInput):
                if client.mask_count != count:
                    raise AssertionError(f"client {client.client_id} masked {client.mask_count}")
                self.prg_s.append(before if before is not None else raw(count))
                self.mask_s.append(client.mask_seconds)
                self.masks.append(count)
            return reply

        return paired

    def figures(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(headline figures: medians and the ratio of medians; their spreads)."""
        per_pair = [a / b for a, b in zip(self.mask_s, self.prg_s, strict=True)]
        headline = {
            "client_mask_s": round(statistics.median(self.mask_s), 5),
            "client_masks": statistics.median(self.masks),
            "prg_limit_client_s": round(statistics.median(self.prg_s), 5),
            "client_mask_vs_prg": ratio(self.mask_s, self.prg_s),
            "client_mask_vs_prg_paired": round(statistics.median(per_pair), 3),
        }
        spreads = {
            "client_mask_s": spread(self.mask_s),
            "prg_limit_client_s": spread(self.prg_s),
            "client_mask_vs_prg_per_pair": spread(per_pair, 3),
        }
        return headline, spreads


class ServerReplay:
    """Replays a simulated session's server on fresh sessions, up to its unmask stage.

    Keeps every client message the simulation's server accepted except the masked inputs: of
    those it keeps the senders and their sum (one d-vector). A replay gives the first sender the
    sum and every other one a zero vector, which leaves the running sum, and everything the
    server does after it, as in the original session, in O(d) memory.
    """

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self._messages: dict[Stage, list[bytes]] = {}
        self._senders: list[int] = []
        self._sum = sim.params.ring.zeros(sim.params.dim)
        server = sim.server
        receive = server.receive

        def recording(data: bytes | ClientMessage) -> None:
            stage = server.stage
            receive(data)  # a refused message raises and is not recorded
            raw = data if isinstance(data, bytes) else encode_message(data)
            if stage is Stage.MASKED_INPUT:
                message = decode_message(raw)
                assert isinstance(message, MaskedInput)
                add_packed(self._sum, message.payload, sim.params.ring)
                self._senders.append(message.sender)
            else:
                self._messages.setdefault(stage, []).append(raw)

        server.receive = recording  # type: ignore[method-assign]

    def session(self, backend: SumBackend | None = None) -> ServerSession:
        """A fresh server that received all the original did: its next step is the unmask."""
        params = self._sim.params
        server = ServerSession(params, self._sim.roster, False, backend=backend)
        for stage in params.stages:
            inbox = self._masked() if stage is Stage.MASKED_INPUT else self._messages.get(stage, [])
            for data in inbox:
                server.receive(data)
            if stage is Stage.UNMASK:
                break
            server.close_stage()
        return server

    def _masked(self) -> Iterator[bytes]:
        params = self._sim.params
        ring = params.ring
        total = pack(ring.reduce(self._sum.copy()), ring)
        zero = pack(ring.zeros(params.dim), ring)
        for i, u in enumerate(self._senders):
            yield encode_message(MaskedInput(params.session_id, u, zero if i else total))

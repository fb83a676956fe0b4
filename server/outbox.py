"""Per-client queues of server items, read by long polls.

Why long polls instead of one long-lived stream per client: a client that is killed, or whose
connection drops, leaves nothing half-open on the server; the round loop never blocks on a
client, it only appends to queues. Every item has a sequence number; a client asks for the
item at ``seq`` and gets it, or waits up to its ``wait_ms`` for it. Items of finished rounds
are dropped once acknowledged: asking for item ``seq`` acknowledges every item before it. A
client process that (re)authenticates starts at the current end of its queue, so everything
queued before is dropped too; a request for a dropped number returns the oldest item held.

The items are domain objects, one type per kind the round loop sends; the gRPC service
(:mod:`server.service`) turns each into the wire's ``ServerItem`` with its sequence number when a
client polls it. Items are immutable: the round loop queues one :class:`RoundStart` for the whole
cohort, so every member receives the same configuration bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundStart:
    """A round begins; the payload is the global model (and SCAFFOLD's server control variate).

    ``config`` is the round's configuration, serialized once for the whole cohort
    (:func:`wire.convert.round_config_bytes`): each member hashes exactly these bytes into what
    it signs."""

    config: bytes


@dataclass(frozen=True)
class SecAggMessage:
    """The payload is a canonical secure-aggregation message of session ``session_id``."""

    session_id: bytes


@dataclass(frozen=True)
class HeAggregate:
    """CKKS: the payload is the session's encrypted sum, for its one decryptor to decrypt."""

    session_id: bytes


@dataclass(frozen=True)
class RoundEnd:
    """A round attempt ended: ``completed``, or aborted with ``reason``; ``final`` after the last
    configured round or when the federation stops (clients may exit). No payload."""

    round_number: int
    reason: str = ""
    completed: bool = False
    final: bool = False


#: Everything the round loop queues for a client.
Item = RoundStart | SecAggMessage | HeAggregate | RoundEnd


@dataclass(frozen=True)
class Queued:
    """An item as a poll returns it: its sequence number in its outbox, and its payload."""

    seq: int
    item: Item
    payload: bytes


class Outbox:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[int, tuple[Item, bytes]] = {}
        self._first = 0
        self._next = 0
        self.last_poll = 0.0
        self.polling = 0

    def push(self, item: Item, payload: bytes = b"") -> int:
        """Queue ``item``; returns its sequence number."""
        with self._cond:
            seq = self._next
            self._items[seq] = (item, payload)
            self._next += 1
            self._cond.notify_all()
            return seq

    def restart(self) -> int:
        """Drop everything queued so far (a new client process cannot use it); returns the
        sequence number its first poll should ask for."""
        with self._cond:
            self._items.clear()
            self._first = self._next
            return self._next

    def _acknowledge(self, seq: int) -> None:
        while self._first < min(seq, self._next):
            self._items.pop(self._first, None)
            self._first += 1

    def get(
        self, seq: int, timeout_s: float, alive: Callable[[], bool] | None = None
    ) -> Queued | None:
        """The item at ``seq``, waiting up to ``timeout_s``; ``alive`` (the poll's RPC still
        open) is checked every half second, so a client that died stops counting as polling."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self.polling += 1
            self.last_poll = time.monotonic()
            self._acknowledge(seq)
            try:
                while True:
                    wanted = max(seq, self._first)
                    if wanted < self._next:
                        return Queued(wanted, *self._items[wanted])
                    left = deadline - time.monotonic()
                    if left <= 0 or (alive is not None and not alive()):
                        return None
                    self._cond.wait(min(left, 0.5))
            finally:
                self.polling -= 1
                self.last_poll = time.monotonic()


class Mailboxes:
    """The outboxes of all admitted clients, created on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[int, Outbox] = {}

    def of(self, client_id: int) -> Outbox:
        with self._lock:
            box = self._boxes.get(client_id)
            if box is None:
                box = self._boxes[client_id] = Outbox()
            return box

    def online(self, within_s: float) -> list[int]:
        """Clients polling now or within the last ``within_s`` seconds, sorted."""
        now = time.monotonic()
        with self._lock:
            boxes = list(self._boxes.items())
        return sorted(c for c, b in boxes if b.polling or now - b.last_poll <= within_s)

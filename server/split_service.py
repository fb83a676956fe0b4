"""The coordinator's side of split training: institutions' steps served in turn, with deadlines.

The compute is :class:`clients.split.middle.MiddleServer` (the server's blocks and their LoRA,
the same code ``fedsec simulate --mode split`` runs in one process); this module adds the
network around it. Per round:

* :meth:`SplitService.begin` opens the round's :class:`~fl_core.split.SplitRound` (the sorted
  cohort, ``local_steps`` steps each) and snapshots the server's part;
* each institution opens one ``SplitSteps`` stream (:meth:`SplitService.serve`, on a gRPC handler
  thread; admitted by its session token like every other call, over the same TLS channel): it
  waits until its turn, gets ``SplitTurn``, then sends each step's bottom activation and top
  gradient and gets the top activation and bottom gradient back. Every tensor's header is
  checked against the round's :class:`~fl_core.split.StepLimits` and the step the server waits
  for before its payload is allocated; the middle runs one step at a time;
* the round loop (:meth:`SplitService.run_turns`) watches the deadlines: each message of the
  current institution is due ``step_timeout_s`` after the server's last answer (or after its
  turn began; an institution that has not opened its stream yet has at least the round's
  ``join_timeout_s``, as it builds its model first). An institution that misses one, closes its
  stream or sends a refused tensor is dropped from the round with a one-line reason in the log
  ("client 3 lost mid-step 4: ..."), and the turn passes on; its stream is ended with that
  reason if it is still open. A dropped institution never uploads, so the secure sum of the
  client parts goes on without it (or the round aborts below its threshold, as for any dropout);
* :meth:`SplitService.rollback` restores the server's part when the round aborts, so a round
  that releases nothing leaves no trace in the model either; :meth:`SplitService.vector` is
  checkpointed with the round when it completes.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from fl_core.adapter_io import load_adapter
from fl_core.errors import FLError
from fl_core.round_config import SplitTask, TrainTask
from fl_core.split import (
    WHAT_THE_SERVER_SEES,
    ClientDropped,
    Phase,
    SplitError,
    SplitLayout,
    SplitProtocolError,
    SplitRound,
    SplitTensorError,
    StepLimits,
)
from fl_core.toml_config import ConfigError
from server.admission import Refusal
from wire import fedsec_pb2 as pb
from wire.framing import PayloadTooLarge, WireFormatError
from wire.split_wire import StreamEnded, read_tensor, tensor_frames

if TYPE_CHECKING:
    from clients.split.middle import MiddleServer
    from server.config import ServerConfig

log = logging.getLogger("fedsec.server")

#: How often a waiting stream checks that its client is still connected.
_POLL_S = 0.5


@dataclass(frozen=True)
class SplitPhase:
    """How a round's split steps ended: who ran all its steps, who was dropped and why."""

    finished: tuple[int, ...]
    dropped: dict[int, str]


@dataclass
class _Open:
    round_number: int
    session_id: bytes
    round: SplitRound
    limits: StepLimits
    snapshot: np.ndarray


class SplitService:
    def __init__(
        self, middle: MiddleServer, step_timeout_s: float, join_timeout_s: float = 0.0
    ) -> None:
        self._middle = middle
        self.step_timeout_s = step_timeout_s
        #: How long after the round starts an institution may take to open its stream.
        self.join_timeout_s = join_timeout_s
        self._began = 0.0
        self._cond = threading.Condition()
        self._open: _Open | None = None
        self._streams: set[int] = set()
        #: When the current institution's clock started: its turn began or the server answered.
        self._clock = 0.0

    @property
    def hidden_size(self) -> int:
        return self._middle.split.hidden_size

    @property
    def layout(self) -> SplitLayout:
        """The adapter's trainable tensors cut in two (the global vector is the client part)."""
        return self._middle.split.layout

    def describe(self) -> dict[str, object]:
        """run.json's ``split``: the cut, both parts' sizes, and what the server sees. The
        activation noise is each institution's own setting, which the server is not told."""
        split = self._middle.split
        return {
            **split.spec.describe(split.num_layers),
            "client_part": split.layout.client.size,
            "server_part": split.layout.server.size,
            "activation_noise": None,
            "server_lr": self._middle.settings.lr,
            "step_timeout_s": self.step_timeout_s,
            "what_the_server_sees": WHAT_THE_SERVER_SEES,
        }

    def task(self, train: TrainTask, max_length: int) -> SplitTask:
        """A round's split task: its train task with the cut, the step limits and the
        deadlines every institution of the round gets."""
        return SplitTask(
            train,
            self._middle.split.spec,
            max_length,
            self.hidden_size,
            self.step_timeout_s,
            self.join_timeout_s,
        )

    def vector(self) -> np.ndarray:
        return self._middle.vector()

    def set_vector(self, vector: np.ndarray) -> None:
        self._middle.set_vector(vector)

    # --- the round loop -----------------------------------------------------------------------

    def begin(
        self,
        round_number: int,
        session_id: bytes,
        cohort: tuple[int, ...],
        steps: int,
        limits: StepLimits,
    ) -> None:
        with self._cond:
            split_round = self._middle.begin_round(sorted(cohort), steps, limits)
            self._open = _Open(round_number, session_id, split_round, limits, self.vector())
            self._streams = set()
            self._clock = self._began = time.monotonic()
            self._cond.notify_all()

    def run_turns(self, stop: threading.Event) -> SplitPhase:
        """Wait through every institution's turn, dropping whoever misses a deadline."""
        with self._cond:
            opened = self._open
            if opened is None:
                raise SplitProtocolError("no split round is open")
            split_round = opened.round
            self._clock = time.monotonic()
            while not split_round.done and not stop.is_set():
                current = split_round.current
                due = self._clock + self.step_timeout_s
                if current not in self._streams:
                    # Institutions build their model before they open a stream.
                    due = max(due, self._began + self.join_timeout_s)
                left = due - time.monotonic()
                if left > 0:
                    self._cond.wait(min(left, _POLL_S))
                    continue
                expected = split_round.expected()
                if current is None or expected is None:
                    break
                if current not in self._streams:
                    reason = (
                        f"never opened its split stream (join_timeout_s "
                        f"{self.join_timeout_s:g} s, step_timeout_s {self.step_timeout_s:g} s)"
                    )
                else:
                    reason = (
                        f"lost mid-step {expected.step}: no {expected.phase.value} within "
                        f"{self.step_timeout_s:g} s of the server's last answer"
                    )
                self._drop(current, reason)
            return SplitPhase(split_round.finished, split_round.dropped)

    def end(self) -> None:
        """Close the round: streams still open are ended at their next message."""
        with self._cond:
            self._open = None
            self._cond.notify_all()

    def rollback(self) -> None:
        """The round released nothing: put the server's part back as it was at its start."""
        with self._cond:
            if self._open is not None:
                self._middle.set_vector(self._open.snapshot)

    def _drop(self, client: int, reason: str) -> None:
        """With the lock held."""
        opened = self._open
        if opened is None or opened.round.phase_of(client) in (Phase.DROPPED, Phase.FINISHED):
            return
        was_current = opened.round.current == client
        self._middle.drop(client, reason)
        log.warning(
            "round %d: client %d dropped from split training: %s",
            opened.round_number,
            client,
            reason,
        )
        if was_current:
            self._clock = time.monotonic()
        self._cond.notify_all()

    # --- one institution's stream (a gRPC handler thread) ---------------------------------

    def serve(
        self, client: int, opening: pb.SplitOpen, requests: Iterator[pb.SplitUp], context: Any
    ) -> Iterator[pb.SplitDown]:
        """The ``SplitSteps`` stream of ``client``; every refusal is a :class:`Refusal`."""
        opened = self._admit(client, opening)
        frames = self._watched(client, opened, requests, context)
        try:
            self._wait_for_turn(client, opened, context)
            yield pb.SplitDown(turn=pb.SplitTurn())
            for step in range(opened.round.steps):
                header, hidden = self._read(client, opened, frames, pb.BOTTOM_ACTIVATION, step)
                lengths = np.asarray(header.lengths, dtype=np.int64)
                out = self._compute(
                    client,
                    opened,
                    functools.partial(self._middle.activation, client, step, hidden, lengths),
                )
                yield from tensor_frames(pb.SplitDown, step, pb.TOP_ACTIVATION, out)
                _, grad = self._read(client, opened, frames, pb.TOP_GRADIENT, step, out.shape)
                back = self._compute(
                    client, opened, functools.partial(self._middle.gradient, client, step, grad)
                )
                yield from tensor_frames(pb.SplitDown, step, pb.BOTTOM_GRADIENT, back)
        finally:
            with self._cond:
                self._streams.discard(client)
                if opened.round.phase_of(client) not in (Phase.FINISHED, Phase.DROPPED):
                    self._drop(client, "its split stream ended before its last step")

    def _watched(
        self, client: int, opened: _Open, requests: Iterator[pb.SplitUp], context: Any
    ) -> Iterator[pb.SplitUp]:
        """The client's frames, read by a helper thread so that this handler, while it waits,
        still notices that the client was dropped (a deadline the round loop enforced) and ends
        the stream with the reason, instead of blocking until the client itself gives up."""
        arrived: queue.Queue[pb.SplitUp | BaseException | None] = queue.Queue()

        def read() -> None:
            try:
                for frame in requests:
                    arrived.put(frame)
                arrived.put(None)
            except BaseException as exc:  # the RPC ended under the reader: hand it over
                arrived.put(exc)

        threading.Thread(target=read, name=f"split-reader-{client}", daemon=True).start()
        while True:
            try:
                item = arrived.get(timeout=_POLL_S)
            except queue.Empty:
                with self._cond:
                    self._still_on(client, opened)
                    if not context.is_active():
                        self._drop(client, "connection lost mid-step")
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _admit(self, client: int, opening: pb.SplitOpen) -> _Open:
        with self._cond:
            opened = self._open
            if opened is None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "no split round is in progress")
            if (
                opening.round_number != opened.round_number
                or opening.session_id != opened.session_id
            ):
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"split stream for round {opening.round_number} session "
                    f"{opening.session_id[:8].hex()}; the current one is round "
                    f"{opened.round_number} session {opened.session_id[:8].hex()}",
                )
            if client not in opened.round.order:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED, f"client {client} is not in this cohort"
                )
            if client in self._streams:
                raise Refusal(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"client {client} already has a split stream open in this round",
                )
            phase = opened.round.phase_of(client)
            if phase is not Phase.WAITING and phase is not Phase.ACTIVATION:
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"client {client} is {phase.value} in this round's split training",
                )
            self._streams.add(client)
            return opened

    def _wait_for_turn(self, client: int, opened: _Open, context: Any) -> None:
        with self._cond:
            while True:
                self._still_on(client, opened)
                if opened.round.current == client:
                    return
                if not context.is_active():
                    self._drop(client, "disconnected while waiting for its turn")
                self._cond.wait(_POLL_S)

    def _still_on(self, client: int, opened: _Open) -> None:
        """With the lock held: refuse a client whose round is over or who was dropped."""
        if self._open is not opened:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the split phase of round {opened.round_number} is over",
            )
        if opened.round.phase_of(client) is Phase.DROPPED:
            raise Refusal(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"dropped from round {opened.round_number}: {opened.round.dropped[client]}",
            )

    def _read(
        self,
        client: int,
        opened: _Open,
        frames: Iterator[pb.SplitUp],
        kind: pb.TensorKind,
        step: int,
        like: tuple[int, ...] | None = None,
    ) -> tuple[pb.TensorHeader, np.ndarray]:
        def check(header: pb.TensorHeader) -> None:
            if header.kind != kind or header.step != step:
                raise SplitProtocolError(
                    f"sent a {pb.TensorKind.Name(header.kind)} of step {header.step}; the "
                    f"server waits for the {pb.TensorKind.Name(kind)} of step {step}"
                )
            shape = tuple(int(d) for d in header.shape)
            if like is None:
                opened.limits.check_activation(shape, [int(n) for n in header.lengths])
            else:
                opened.limits.check_like(shape, like)

        what = f"client {client}'s {pb.TensorKind.Name(kind)} of step {step}"
        try:
            return read_tensor(frames, check, what)
        except StreamEnded:
            with self._cond:
                self._drop(client, f"closed its stream mid-step {step} (before its {what})")
            raise Refusal(grpc.StatusCode.CANCELLED, "stream closed mid-step") from None
        except (SplitError, WireFormatError) as exc:
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(exc, PayloadTooLarge)
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            with self._cond:
                self._drop(client, f"refused {what}: {exc}")
            raise Refusal(code, f"{type(exc).__name__}: {exc}") from None
        except grpc.RpcError:
            with self._cond:
                self._drop(client, f"connection lost mid-step {step} (before its {what})")
            raise Refusal(grpc.StatusCode.CANCELLED, "connection lost") from None

    def _compute(self, client: int, opened: _Open, run: Callable[[], np.ndarray]) -> np.ndarray:
        with self._cond:
            self._still_on(client, opened)
            try:
                out = run()
            except ClientDropped as exc:
                raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
            except SplitTensorError as exc:
                # The middle dropped the client already; say so in the log.
                log.warning(
                    "round %d: client %d dropped from split training: %s",
                    opened.round_number,
                    client,
                    exc,
                )
                self._clock = time.monotonic()
                self._cond.notify_all()
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except SplitProtocolError as exc:
                self._drop(client, str(exc))
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            self._clock = time.monotonic()
            self._cond.notify_all()
            return out


def build_split_service(config: ServerConfig) -> SplitService:
    """The server's split model: ``[split]``'s base with ``task.initial_adapter`` loaded, cut as
    ``[split]`` says. torch and the model code load here, only for ``kind = "split"``. Every
    failure is a :class:`ConfigError` naming what to fix (refused at start, not mid-round)."""
    import torch
    from transformers import PreTrainedModel

    from clients.devices import resolve_runtime
    from clients.lora_targets import head_path
    from clients.model_factory import build_default_base, load_source, model_source
    from clients.split.middle import MiddleServer, MiddleSettings
    from clients.split.model import SplitModel
    from clients.synthetic import make_federation
    from clients.trainer import LoraModel, LoraSettings
    from fl_core.split import SplitSpec

    task, split = config.task, config.task.split
    if split is None or task.initial_adapter is None:
        raise ConfigError('[task] kind = "split" needs a [split] table and task.initial_adapter')
    if split.threads is not None:
        torch.set_num_threads(split.threads)
    try:
        tensors, adapter = load_adapter(task.initial_adapter)
        runtime = resolve_runtime(split.device, "fp32", "none")  # type: ignore[arg-type]
        source = model_source(split.base)
        base: PreTrainedModel
        if source.kind == "embedded":
            federation = make_federation(
                split.institutions, split.records, seed=split.federation_seed
            )
            base, _ = build_default_base(federation.corpus())
        else:
            base, _ = load_source(source, runtime)
        head = head_path(base)
        head_leaf = None if head is None else head.rsplit(".", 1)[-1]
        settings = LoraSettings(
            rank=adapter.r,
            alpha=adapter.lora_alpha,
            dropout=adapter.lora_dropout,
            targets=tuple(adapter.target_modules),
            # The head is adapted exactly when the adapter names it.
            head="yes" if head_leaf in adapter.target_modules else "no",
            mode="ffa" if task.lora_mode == "ffa" else "plain",
            init_seed=0,
        )
        lm = LoraModel(base, settings, runtime)
        lm.set_tensors(tensors)  # the initial adapter, name by name and shape by shape
        model = SplitModel(lm, SplitSpec(split.client_bottom, split.client_top))
        recipe = task.recipe
        middle = MiddleServer(
            model,
            MiddleSettings(
                lr=split.server_lr or recipe.lr,
                max_grad_norm=recipe.max_grad_norm,
                optimizer=recipe.optimizer,
            ),
        )
    except (FLError, OSError) as exc:
        raise ConfigError(f"[split] the server's model: {type(exc).__name__}: {exc}") from None
    return SplitService(middle, split.step_timeout_s, config.rounds.join_timeout_s)

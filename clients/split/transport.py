"""An institution's ``SplitSteps`` stream: its :class:`~clients.split.model.MiddleLink` over gRPC.

One stream per round, on the client's TLS channel and admitted by its session token (the server
refuses a token it did not issue, a round or session other than the current one, and a second
stream of the same institution). The client waits for ``SplitTurn`` (at most as long as the
institutions before it in the sorted cohort may take,
:func:`wire.split_wire.turn_timeout`), then each answer of the server is due within the
round's ``step_timeout_s``; a late or refused answer ends the stream and raises a
:class:`SplitLinkError` whose message says which step and why, so the client leaves the round
with one line in its log and tells the server. What the server sends back is checked like what
it receives: the exact shape of the step, no NaN/Inf.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from fl_core.errors import FLError
from fl_core.round_config import RoundConfig, SplitTask
from fl_core.split import SplitError, StepLimits
from wire import fedsec_pb2 as pb
from wire.framing import WireFormatError
from wire.split_wire import read_tensor, tensor_frames, turn_timeout

log = logging.getLogger("fedsec.client")


class SplitLinkError(FLError):
    """The split stream of this round ended early; the client leaves the round."""


class SplitStepTimeout(SplitLinkError):
    """The server did not answer (or give the turn) before the deadline."""


class SplitStreamRefused(SplitLinkError):
    """The server ended the stream with a refusal, or sent something this client refuses."""


class GrpcSplitLink:
    """The institution's link to the server's blocks for one round."""

    def __init__(
        self,
        stub: Any,
        token: bytes,
        config: RoundConfig,
        client_id: int,
        stall_gradient: bool = False,
    ) -> None:
        task = config.task
        if not isinstance(task, SplitTask):
            raise SplitStreamRefused(f"round {config.round_number} is not a split round")
        #: Fault injection (``[testing] stall_before = "split_gradient"``): hang instead of
        #: sending the first gradient, as a client that dies mid-step.
        self._stall_gradient = stall_gradient
        cohort = sorted(config.cohort)
        if client_id not in cohort:
            raise SplitStreamRefused(f"client {client_id} is not in round {config.round_number}")
        self._round = config.round_number
        self._limits: StepLimits = task.limits
        self._step_timeout = task.step_timeout_s
        steps = task.train.local_steps
        self._turn_timeout = turn_timeout(
            cohort.index(client_id), steps, self._step_timeout, task.join_timeout_s
        )
        self._outgoing: queue.Queue[pb.SplitUp | None] = queue.Queue()
        self._outgoing.put(
            pb.SplitUp(
                open=pb.SplitOpen(
                    token=token, round_number=config.round_number, session_id=config.session_id
                )
            )
        )
        self._timed_out = False
        self.bytes_up = 0
        self.bytes_down = 0
        overall = self._turn_timeout + steps * 2 * self._step_timeout + 60.0
        self._call = stub.SplitSteps(self._requests(), timeout=overall)
        self._responses: Iterator[pb.SplitDown] = iter(self._call)

    def _requests(self) -> Iterator[pb.SplitUp]:
        while True:
            frame = self._outgoing.get()
            if frame is None:
                return
            self.bytes_up += frame.ByteSize()
            yield frame

    def _frames(self, within_s: float, what: str) -> Iterator[pb.SplitDown]:
        """The server's next frames, each due within ``within_s``."""
        while True:
            timer = threading.Timer(within_s, self._expire)
            timer.start()
            try:
                frame = next(self._responses, None)
            except grpc.RpcError as exc:
                raise self._failure(exc, what, within_s) from None
            finally:
                timer.cancel()
            if frame is None:
                return
            self.bytes_down += frame.ByteSize()
            yield frame

    def _expire(self) -> None:
        self._timed_out = True
        self._call.cancel()

    def _failure(self, exc: grpc.RpcError, what: str, within_s: float) -> SplitLinkError:
        if self._timed_out:
            return SplitStepTimeout(
                f"round {self._round}: no {what} from the server within {within_s:g} s"
            )
        code = exc.code()
        return SplitStreamRefused(
            f"round {self._round}: the server ended the split stream while this client waited "
            f"for {what}: {code.name if code else 'UNKNOWN'}: {exc.details()}"
        )

    def wait_for_turn(self) -> None:
        frame = next(self._frames(self._turn_timeout, "turn"), None)
        if frame is None or frame.WhichOneof("body") != "turn":
            raise SplitStreamRefused(f"round {self._round}: the server did not give the turn")

    def _exchange(
        self,
        step: int,
        kind: pb.TensorKind,
        array: np.ndarray,
        answer: pb.TensorKind,
        lengths: np.ndarray | None = None,
    ) -> np.ndarray:
        rows = [] if lengths is None else [int(n) for n in lengths]
        for frame in tensor_frames(pb.SplitUp, step, kind, array, rows):
            self._outgoing.put(frame)
        what = f"{pb.TensorKind.Name(answer)} of step {step}"

        def check(header: pb.TensorHeader) -> None:
            if header.kind != answer or header.step != step:
                raise SplitStreamRefused(
                    f"round {self._round}: the server sent a {pb.TensorKind.Name(header.kind)} "
                    f"of step {header.step} where this client waits for the {what}"
                )
            self._limits.check_like(tuple(int(d) for d in header.shape), array.shape)

        try:
            _, out = read_tensor(self._frames(self._step_timeout, f"the {what}"), check, what)
        except (SplitError, WireFormatError) as exc:
            self.close()
            raise SplitStreamRefused(
                f"round {self._round}: refused the server's {what}: {exc}"
            ) from None
        return out

    def forward(self, step: int, hidden: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if step == 0:
            self.wait_for_turn()
        return self._exchange(step, pb.BOTTOM_ACTIVATION, hidden, pb.TOP_ACTIVATION, lengths)

    def backward(self, step: int, grad: np.ndarray) -> np.ndarray:
        if self._stall_gradient:
            log.warning("fault injection: stalling before the gradient of step %d", step)
            while True:
                time.sleep(3600)
        return self._exchange(step, pb.TOP_GRADIENT, grad, pb.BOTTOM_GRADIENT)

    def close(self) -> None:
        """End the stream (after the last step, or when leaving the round)."""
        self._outgoing.put(None)
        if not self._call.done():
            self._call.cancel()

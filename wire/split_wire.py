"""Split-training tensors on the wire (the ``SplitSteps`` stream), sized before they are read.

A step tensor travels as a :class:`TensorHeader` (step, kind, shape, row lengths, payload size)
followed by chunk frames, like every large payload (:mod:`wire.framing`): the receiver
runs its check of the header (the round's step limits, the step it waits for) *before*
allocating, the declared size must be exactly ``4 * rows * tokens * hidden``, and a chunk that
overruns it or a stream that ends early is a :class:`~wire.framing.WireFormatError`.
Payloads are little-endian float32 in C order; NaN/Inf are refused by the receiver.

:func:`turn_timeout` is what both ends derive from a round's
:class:`~fl_core.round_config.SplitTask` (whose ``limits`` are the step tensors' bounds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np

from fl_core.split import FLOAT_BYTES, check_tensor_values
from wire import fedsec_pb2 as pb
from wire.framing import CHUNK_BYTES, PayloadAssembler, WireFormatError, split_chunks

_LE_FLOAT32 = np.dtype("<f4")


class _Frame(Protocol):
    """A SplitUp or a SplitDown: both carry tensors and chunks."""

    tensor: pb.TensorHeader
    chunk: bytes

    def WhichOneof(self, name: str) -> str | None: ...


F = TypeVar("F", pb.SplitUp, pb.SplitDown)


class StreamEnded(WireFormatError):
    """The other side closed the stream where a step tensor was due."""


def turn_timeout(
    position: int, local_steps: int, step_timeout_s: float, join_timeout_s: float
) -> float:
    """How long the institution at ``position`` (0-based) of the sorted cohort may wait for its
    turn: the time everyone may take to open its stream, then everyone before it running all
    its steps with each of its two messages per step at the deadline, plus one step's deadline
    of slack."""
    return join_timeout_s + (position * local_steps * 2 + 1) * step_timeout_s


def tensor_frames(
    frame: type[F],
    step: int,
    kind: pb.TensorKind,
    array: np.ndarray,
    lengths: Sequence[int] = (),
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[F]:
    """The frames of one step tensor: the header, then its bytes in chunks."""
    if array.ndim != 3:
        raise WireFormatError(f"a step tensor is rows x tokens x hidden, got shape {array.shape}")
    payload = np.ascontiguousarray(array, dtype=_LE_FLOAT32).tobytes()
    header = pb.TensorHeader(
        step=step,
        kind=kind,
        shape=list(array.shape),
        lengths=[int(n) for n in lengths],
        payload_size=len(payload),
    )
    yield frame(tensor=header)
    for chunk in split_chunks(payload, chunk_bytes):
        yield frame(chunk=chunk)


def read_tensor(
    frames: Iterator[_Frame],
    check: Callable[[pb.TensorHeader], None],
    what: str,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[pb.TensorHeader, np.ndarray]:
    """Read one step tensor. ``check(header)`` refuses a header (wrong step, kind or shape for
    the round) by raising; it runs before the payload is allocated."""
    first = next(frames, None)
    if first is None:
        raise StreamEnded(f"the stream ended before {what}")
    if first.WhichOneof("body") != "tensor":
        raise WireFormatError(f"expected {what}, got a {first.WhichOneof('body')} frame")
    header = first.tensor
    check(header)
    shape = tuple(int(d) for d in header.shape)
    expected = FLOAT_BYTES * int(np.prod(shape)) if shape else 0
    if header.payload_size != expected:
        raise WireFormatError(
            f"{what}: declared {header.payload_size} bytes for shape {shape} ({expected} needed)"
        )
    assembler = PayloadAssembler(header.payload_size, expected, chunk_bytes)
    while not assembler.complete:
        frame = next(frames, None)
        if frame is None:
            break
        if frame.WhichOneof("body") != "chunk":
            raise WireFormatError(f"{what}: a new frame arrived before the tensor was complete")
        assembler.add(frame.chunk)
    array = np.frombuffer(assembler.finish(), dtype=_LE_FLOAT32).reshape(shape)
    array = array.astype(np.float32)
    check_tensor_values(array, what)
    return header, array

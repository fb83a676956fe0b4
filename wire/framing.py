"""Chunked transport of large payloads with the size checked before anything is allocated.

A secure-aggregation ``MaskedInput`` is about ``ring_bits * dim / 8`` bytes and the global
adapter ``4 * dim`` bytes: both exceed gRPC's default 4 MiB message limit at realistic sizes.
Rather than raising that limit (which would let any peer make the receiver buffer an arbitrary
message), every large payload travels as one header frame that *declares* its total size,
followed by chunk frames of at most :data:`CHUNK_BYTES`. The receiver compares the declared size
with what the round allows (``limit``) and only then allocates exactly that many bytes; a chunk
that is too big, too many bytes, or a stream that ends early is a :class:`WireFormatError`.
The gRPC message limit is set explicitly to one chunk plus framing overhead, so no single
protobuf message can be larger than a chunk either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from secagg.errors import MessageFormatError
from wire import fedsec_pb2 as pb

#: Bytes of payload per chunk frame. 1 MiB keeps per-frame overhead below 0.01 %.
CHUNK_BYTES = 1 << 20
#: Largest gRPC message either side accepts or sends: one chunk plus the frame's own fields
#: (a header frame with a token and session id is far below this margin).
MAX_FRAME_BYTES = CHUNK_BYTES + (64 << 10)


class WireFormatError(MessageFormatError):
    """Frames that do not form a well-formed upload or download (order, sizes, truncation)."""


class PayloadTooLarge(WireFormatError):
    """A declared payload larger than the round allows; refused before any allocation."""


class ChunkTooLarge(WireFormatError):
    """A chunk frame above :data:`CHUNK_BYTES`, or one that overruns the declared size."""


def grpc_options(max_frame_bytes: int = MAX_FRAME_BYTES) -> list[tuple[str, int]]:
    """Channel/server options that pin gRPC's message limits to one frame, in both directions."""
    return [
        ("grpc.max_send_message_length", max_frame_bytes),
        ("grpc.max_receive_message_length", max_frame_bytes),
    ]


def split_chunks(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    if chunk_bytes <= 0:
        raise WireFormatError(f"chunk size must be positive, got {chunk_bytes}")
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


class PayloadAssembler:
    """Collects the chunks of one declared payload into a buffer allocated once, up front."""

    def __init__(self, declared_size: int, limit: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        if declared_size < 0:
            raise WireFormatError(f"declared payload size {declared_size} is negative")
        if declared_size > limit:
            raise PayloadTooLarge(
                f"declared payload of {declared_size} bytes exceeds the {limit} bytes allowed"
            )
        self._buffer = bytearray(declared_size)
        self._filled = 0
        self._chunk_bytes = chunk_bytes

    @property
    def complete(self) -> bool:
        return self._filled == len(self._buffer)

    def add(self, chunk: bytes) -> None:
        if len(chunk) > self._chunk_bytes:
            raise ChunkTooLarge(f"chunk of {len(chunk)} bytes exceeds {self._chunk_bytes}")
        end = self._filled + len(chunk)
        if end > len(self._buffer):
            raise ChunkTooLarge(
                f"chunks carry more than the {len(self._buffer)} bytes the header declared"
            )
        self._buffer[self._filled : end] = chunk
        self._filled = end

    def finish(self) -> bytes:
        if not self.complete:
            raise WireFormatError(
                f"stream ended after {self._filled} of {len(self._buffer)} declared bytes"
            )
        return bytes(self._buffer)


def client_frames(
    header: pb.SubmitHeader, payload: bytes, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.ClientFrame]:
    """The frames of one upload: the header (its ``payload_size`` set here), then the chunks."""
    declared = pb.SubmitHeader()
    declared.CopyFrom(header)
    declared.payload_size = len(payload)
    yield pb.ClientFrame(header=declared)
    for chunk in split_chunks(payload, chunk_bytes):
        yield pb.ClientFrame(chunk=chunk)


def server_frames(
    item: pb.ServerItem, payload: bytes = b"", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.ServerFrame]:
    """The frames of one outbox item: the item (its ``payload_size`` set here), then chunks."""
    declared = pb.ServerItem()
    declared.CopyFrom(item)
    declared.payload_size = len(payload)
    yield pb.ServerFrame(item=declared)
    for chunk in split_chunks(payload, chunk_bytes):
        yield pb.ServerFrame(chunk=chunk)


def read_upload(
    frames: Iterable[pb.ClientFrame],
    limit_for: Callable[[pb.SubmitHeader], int],
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[pb.SubmitHeader, bytes]:
    """Reassemble one upload. ``limit_for(header)`` says how many bytes this header may carry
    (it may also refuse the header outright by raising); it runs before any allocation."""
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None or first.WhichOneof("body") != "header":
        raise WireFormatError("an upload must start with a header frame")
    header = first.header
    assembler = PayloadAssembler(header.payload_size, limit_for(header), chunk_bytes)
    for frame in iterator:
        if frame.WhichOneof("body") != "chunk":
            raise WireFormatError("an upload carries exactly one header frame")
        assembler.add(frame.chunk)
    return header, assembler.finish()


def read_item(
    frames: Iterable[pb.ServerFrame],
    limit_for: Callable[[pb.ServerItem], int],
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[pb.ServerItem, bytes]:
    """Reassemble one outbox item and its payload; the client-side mirror of :func:`read_upload`.

    Stops reading as soon as the declared payload is complete, so it works on a stream the
    server keeps open.
    """
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None or first.WhichOneof("body") != "item":
        raise WireFormatError("a server stream must start with an item frame")
    item = first.item
    assembler = PayloadAssembler(item.payload_size, limit_for(item), chunk_bytes)
    while not assembler.complete:
        frame = next(iterator, None)
        if frame is None:
            break
        if frame.WhichOneof("body") != "chunk":
            raise WireFormatError("an item frame arrived before the previous payload was complete")
        assembler.add(frame.chunk)
    return item, assembler.finish()

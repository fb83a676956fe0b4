"""Chunked framing: round trips at every boundary, and each malformed stream refused."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from wire import fedsec_pb2 as pb
from wire.framing import (
    ChunkTooLarge,
    PayloadAssembler,
    PayloadTooLarge,
    WireFormatError,
    client_frames,
    grpc_options,
    read_item,
    read_upload,
    server_frames,
)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 160])
def test_upload_round_trip_at_chunk_boundaries(size: int) -> None:
    payload = os.urandom(size)
    header = pb.SubmitHeader(token=b"t", round_number=3, kind=pb.MASKED_INPUT)
    frames = list(client_frames(header, payload, chunk_bytes=16))
    assert len(frames) == 1 + -(-size // 16)
    got_header, got = read_upload(frames, lambda h: size, chunk_bytes=16)
    assert got == payload
    assert got_header.payload_size == size and got_header.round_number == 3


def test_item_round_trip_stops_at_declared_end_of_an_open_stream() -> None:
    payload = os.urandom(40)
    item = pb.ServerItem(seq=7, round_start=pb.RoundStart(config=b"cfg"))
    # A second item follows on the same stream; reading the first must not consume it.
    stream = iter([*server_frames(item, payload, 16), *server_frames(pb.ServerItem(seq=8))])
    got_item, got = read_item(stream, lambda i: 40, chunk_bytes=16)
    assert got == payload and got_item.seq == 7
    assert next(stream).item.seq == 8


def test_declared_size_above_limit_is_refused_before_allocation() -> None:
    # 2^60 bytes would fail to allocate; the check must come first.
    with pytest.raises(PayloadTooLarge):
        PayloadAssembler(2**60, limit=1024)


def test_oversized_chunk_is_refused() -> None:
    frames = list(client_frames(pb.SubmitHeader(), b"x" * 64, chunk_bytes=64))
    with pytest.raises(ChunkTooLarge):
        read_upload(frames, lambda h: 64, chunk_bytes=32)


def test_more_bytes_than_declared_is_refused() -> None:
    frames = list(client_frames(pb.SubmitHeader(), b"x" * 10, chunk_bytes=4))
    frames.append(pb.ClientFrame(chunk=b"extra"))
    with pytest.raises(ChunkTooLarge):
        read_upload(frames, lambda h: 100, chunk_bytes=4)


def test_truncated_stream_is_refused() -> None:
    frames = list(client_frames(pb.SubmitHeader(), b"x" * 10, chunk_bytes=4))[:-1]
    with pytest.raises(WireFormatError, match="ended after 8 of 10"):
        read_upload(frames, lambda h: 100, chunk_bytes=4)


def test_stream_without_header_or_with_two_headers_is_refused() -> None:
    with pytest.raises(WireFormatError, match="start with a header"):
        read_upload([pb.ClientFrame(chunk=b"x")], lambda h: 10)
    with pytest.raises(WireFormatError, match="start with a header"):
        read_upload([], lambda h: 10)
    two = [pb.ClientFrame(header=pb.SubmitHeader()), pb.ClientFrame(header=pb.SubmitHeader())]
    with pytest.raises(WireFormatError, match="exactly one header"):
        read_upload(two, lambda h: 10)


def test_limit_callback_can_refuse_a_header() -> None:
    class Refused(Exception):
        pass

    def refuse(header: pb.SubmitHeader) -> int:
        raise Refused(header.kind)

    with pytest.raises(Refused):
        read_upload(client_frames(pb.SubmitHeader(kind=pb.SHARE_KEYS), b"x"), refuse)


def test_grpc_options_bound_both_directions() -> None:
    options = dict(grpc_options(1234))
    assert options == {
        "grpc.max_send_message_length": 1234,
        "grpc.max_receive_message_length": 1234,
    }


def test_checked_in_modules_are_what_protoc_generates(tmp_path: Path) -> None:
    """The checked-in _pb2 modules were generated from the .proto beside them, with the
    command written in wire/__init__.py; a schema edit without regeneration fails."""
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    root = Path(__file__).resolve().parents[2]
    rc = grpc_tools.main(
        [
            "protoc",
            f"-I{root}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(root / "wire/fedsec.proto"),
        ]
    )
    assert rc == 0
    for name in ("fedsec_pb2.py", "fedsec_pb2.pyi", "fedsec_pb2_grpc.py"):
        generated = (tmp_path / "wire" / name).read_text()
        assert generated == (root / "wire" / name).read_text(), name


def _requirement(requirements: list[str], name: str) -> str:
    """The version part of the one requirement on ``name``: ``"protobuf>=6,<8"`` -> ``">=6,<8"``."""
    found = [r[len(name) :] for r in requirements if re.match(rf"{re.escape(name)}[<>=!~ ]", r)]
    assert len(found) == 1, (name, requirements)
    return found[0].replace(" ", "")


def test_dependency_floors_are_what_the_checked_in_stubs_validate() -> None:
    """The generated modules refuse, at import, a protobuf runtime older than their gencode and
    a grpcio older than the grpcio-tools that wrote them: pyproject's floors must be those
    versions, and the `test` extra must pin exactly that grpcio-tools (whose protoc the
    regeneration test runs)."""
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    stub = (root / "wire" / "fedsec_pb2.py").read_text()
    gencode = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", stub)
    assert gencode is not None
    grpc_stub = (root / "wire" / "fedsec_pb2_grpc.py").read_text()
    generated_by = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub)
    assert generated_by is not None
    protobuf = _requirement(project["dependencies"], "protobuf")
    assert protobuf.split(",")[0] == ">=" + ".".join(gencode.groups())
    assert _requirement(project["dependencies"], "grpcio") == ">=" + generated_by[1]
    pin = "==" + generated_by[1]
    assert _requirement(project["optional-dependencies"]["test"], "grpcio-tools") == pin
    assert f"grpcio-tools{pin}" in (root / "wire" / "__init__.py").read_text()

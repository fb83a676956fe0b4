"""wire.convert's names for the schema's codes, used past the edge instead of protobuf's."""

from __future__ import annotations

from wire import fedsec_pb2 as pb
from wire.convert import KIND_OF, UploadKind


def test_upload_kinds_are_the_schemas_message_kinds() -> None:
    # Every kind but the unset default, by the same name and code: a kind added to the schema
    # (or renumbered) without its UploadKind would be refused by the server as unknown.
    schema = {name: code for name, code in pb.MessageKind.items() if code}
    assert {kind.name: kind.value for kind in UploadKind} == schema


def test_every_protocol_message_kind_is_an_upload_kind() -> None:
    assert {UploadKind(code) for code in KIND_OF.values()} == {
        UploadKind.SEED_COMMIT,
        UploadKind.ADVERTISE_KEYS,
        UploadKind.SHARE_KEYS,
        UploadKind.MASKED_INPUT,
        UploadKind.CONSISTENCY_SIGNATURE,
        UploadKind.UNMASK_RESPONSE,
    }

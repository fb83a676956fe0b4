"""Bonawitz / SecAgg+ secure aggregation as sans-IO client and server state machines."""

from secagg.protocol.client import ClientSession
from secagg.protocol.common import PROTOCOL_STAGES, ClientPolicy, RoundParams, Stage, context_digest
from secagg.protocol.server import AggregateResult, ServerSession

__all__ = [
    "PROTOCOL_STAGES",
    "AggregateResult",
    "ClientPolicy",
    "ClientSession",
    "RoundParams",
    "ServerSession",
    "Stage",
    "context_digest",
]

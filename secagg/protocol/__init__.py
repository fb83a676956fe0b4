"""Bonawitz / SecAgg+ secure aggregation as sans-IO client and server state machines."""

from secagg.protocol.client import ClientSession
from secagg.protocol.common import PROTOCOL_STAGES, ClientPolicy, RoundParams, Stage, context_digest
from secagg.protocol.server import AggregateResult, InProcessSum, ServerSession, SumBackend

__all__ = [
    "PROTOCOL_STAGES",
    "AggregateResult",
    "ClientPolicy",
    "ClientSession",
    "InProcessSum",
    "RoundParams",
    "ServerSession",
    "Stage",
    "SumBackend",
    "context_digest",
]

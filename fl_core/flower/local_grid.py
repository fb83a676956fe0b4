"""A Flower ``Grid`` that delivers every message to a ``ClientApp`` in this process.

For tests, benchmarks and debugging: a ServerApp's workflow (fedsec's, or Flower's own
``SecAggPlusWorkflow``) runs against real ``ClientApp``s and their mods, through Flower's
``Message``/``RecordDict`` API, with one ``Context`` per node kept between messages as a
SuperNode keeps it, but without Ray or a SuperLink. Each message is delivered as a deep copy,
and so is each reply, as over a network: a receiver that edits what it got (Flower's
``secaggplus_mod`` pops keys from its records) cannot change what another node receives. A
ClientApp that raises answers with an error reply, as Flower's engines do; a node in
:attr:`LocalGrid.silent` never answers (a dropout).

Constructing one makes this process the ServerApp task of run ``run_id`` (Flower's
``TaskIdentity``, which every new ``Message`` reads), as Flower's own runtime does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping

from fl_core.errors import FLError
from fl_core.flower import require_flwr

require_flwr()

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

#: Flower's error code for "the ClientApp raised".
CLIENT_APP_RAISED = 2


class LocalGridError(FLError, ValueError):
    """Node ids a LocalGrid cannot use."""


class LocalGrid(Grid):
    """One node per key of ``node_configs`` (its Flower node id), each with its own
    ``Context``."""

    def __init__(
        self,
        app: ClientApp | Callable[[Message, Context], Message],
        node_configs: Mapping[int, Mapping[str, bool | float | int | str]],
        run_config: Mapping[str, bool | float | int | str] | None = None,
        run_id: int = 1,
    ) -> None:
        if SUPERLINK_NODE_ID in node_configs:
            raise LocalGridError(f"node id {SUPERLINK_NODE_ID} is the SuperLink's")
        self._app = app
        self._run = Run.create_empty(run_id)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts = {
            node: Context(run_id, node, dict(config), RecordDict(), dict(run_config or {}))
            for node, config in node_configs.items()
        }
        #: Nodes that stop answering (a dropout): their messages get no reply.
        self.silent: set[int] = set()
        #: Seconds spent copying messages and replies (this grid's stand-in for the network).
        self.copy_s = 0.0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)  # fmt: skip

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.contexts or node in self.silent:
                continue
            begin = time.perf_counter()
            message = copy.deepcopy(message)
            self.copy_s += time.perf_counter() - begin
            try:
                reply = self._app(message, self.contexts[node])
            except Exception as exc:  # Flower's engines turn a raising app into an error reply
                reply = Message(
                    Error(CLIENT_APP_RAISED, f"{type(exc).__name__}: {exc}"), reply_to=message
                )
            begin = time.perf_counter()
            replies.append(copy.deepcopy(reply))
            self.copy_s += time.perf_counter() - begin
        return replies

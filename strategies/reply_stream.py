"""Replies handed to the strategy one at a time, as each is pulled, instead of a round's list.

Flower's `Grid.send_and_receive` pushes a round's instructions and pulls until every reply is
in (or the timeout), then returns them all: a ServerApp then holds every site's update at once,
sites x model bytes (20 GB for 20 sites at 62M parameters). `StreamingGrid` keeps the same push,
timeout and reply semantics, but its `send_and_receive` returns an iterator that pulls each
outstanding reply by its own message id (`Grid.pull_messages([one id])`) and yields it before
pulling the next, so a strategy that folds each reply as it comes and drops it
(`EncryptedFedAvg.aggregate_train`) holds one reply at a time.

Where the others wait: at the SuperLink, in its LinkState and object store, from the moment a
site has sent a reply until the ServerApp pulls it (Flower deletes a reply there once pulled and
its receipt confirmed). Pulling as they come keeps that queue to the replies that arrive while
the ServerApp is folding one, rather than every reply of the round.
"""

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL_SECONDS = 0.25
"""Pause after a pass over the outstanding replies that found none: the longest a reply waits at
the SuperLink before it is pulled (a pass costs one small pull request per outstanding site)."""


class StreamingGrid(Grid):
    """`grid`, whose `send_and_receive` yields replies as they arrive (see module)."""

    def __init__(self, grid: Grid, poll_seconds: float = POLL_SECONDS) -> None:
        self.grid = grid
        self.poll_seconds = poll_seconds

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterator[Message]:
        """Push now; the returned iterator pulls. As Flower's: no reply after `timeout` seconds
        (None: wait for every one) is waited for, and a node that dropped out answers with the
        SuperLink's error message."""
        waiting = [message_id for message_id in self.grid.push_messages(messages) if message_id]
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._pull(waiting, deadline)

    def _pull(self, waiting: list[str], deadline: float | None) -> Iterator[Message]:
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = False
            for message_id in list(waiting):
                for reply in self.grid.pull_messages([message_id]):
                    pulled = True
                    if message_id in waiting:
                        waiting.remove(message_id)
                    yield reply
                    del reply  # the consumer has it; not held while the next one is pulled
            if not pulled:
                time.sleep(self.poll_seconds)

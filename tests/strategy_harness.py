"""Simulated sites and a Grid fake that drive the strategies with real TenSEAL messages.

The fake only routes messages; every ciphertext is built by the site helpers in
`fedhealth.core.crypto.messages` with a real secret key. A site's `tamper` hook rewrites its
reply (or replaces the whole message) to play a broken or hostile site.
"""

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedhealth.core import fixed_point
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import RoundBinding, decrypt_global
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import (
    build_census_reply,
    build_evaluate_reply,
    build_reply,
    is_census,
    read_census,
    read_instruction,
)
from strategies.encrypted_fedavg import EncryptedFedAvg

Tamper = Callable[[RecordDict, str], RecordDict | None]
"""(reply content, message type) -> a replacement content, or None after editing it in place."""


def random_tensors(seed: int, width: int = 3000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"body.weight": rng.normal(size=(width,)),
            "head.weight": rng.normal(size=(4, 7)).astype(np.float32)}


def only(*message_types: str, edit: Callable[[RecordDict], RecordDict | None]) -> Tamper:
    """A tamper hook that edits replies of these message types and leaves the others alone."""
    def tamper(content: RecordDict, kind: str) -> RecordDict | None:
        return edit(content) if kind in message_types else None
    return tamper


@dataclass
class FakeSite:
    """A site whose "training" pulls the global halfway towards its own target tensors."""

    name: str
    key: SiteKey
    num_examples: int
    target: dict[str, np.ndarray]
    tamper: Tamper | None = None
    seen: list[RecordDict] = field(default_factory=list)  # train/evaluate instructions received
    encrypted: list[dict[str, np.ndarray]] = field(default_factory=list)  # plaintexts sent

    def handle(self, message: Message) -> Message:
        content = self._answer(message)
        if self.tamper is not None:
            content = self.tamper(content, message.metadata.message_type) or content
        return Message(content, reply_to=message)

    def _answer(self, message: Message) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            assert is_census(message.content)
            return build_census_reply(self.key, read_census(message.content), self.num_examples,
                                      self.name)
        self.seen.append(message.content)
        instruction = read_instruction(message.content)
        start = instruction.global_tensors(self.key, TensorLayout.of(self.target))
        if start is None:  # round 1: every site derives the same initialisation from the seed
            start = {k: np.zeros_like(v) for k, v in self.target.items()}
        if message.metadata.message_type == MessageType.EVALUATE:
            return build_evaluate_reply(self.key, instruction, self.num_examples,
                                        {"distance": self.distance(start)}, self.name)
        trained = {k: (0.5 * start[k] + 0.5 * v).astype(v.dtype) for k, v in self.target.items()}
        self.encrypted.append(trained)
        return build_reply(self.key, instruction, trained, self.num_examples,
                           {"loss": float(self.num_examples)}, self.name)

    def distance(self, tensors: dict[str, np.ndarray]) -> float:
        return sum(float(np.abs(tensors[k] - v).mean()) for k, v in self.target.items())


@dataclass
class PlainSite(FakeSite):
    """The same site speaking Flower FedAvg's plaintext messages (`arrays` in and out)."""

    def _answer(self, message: Message) -> RecordDict:
        record = message.content.array_records.get(wire.ARRAYS)
        start = ({n: a.numpy() for n, a in record.items()} if record
                 else {k: np.zeros_like(v) for k, v in self.target.items()})
        identity = ConfigRecord({wire.SITE: self.name})
        metrics = {"num-examples": self.num_examples}
        if message.metadata.message_type == MessageType.EVALUATE:
            return RecordDict({wire.METRICS: MetricRecord({**metrics,
                                                           "distance": self.distance(start)}),
                               wire.CRYPTO: identity})
        trained = {k: (0.5 * start[k] + 0.5 * v).astype(v.dtype) for k, v in self.target.items()}
        return RecordDict({wire.ARRAYS: ArrayRecord({n: Array(t) for n, t in trained.items()}),
                           wire.METRICS: MetricRecord({**metrics, "loss": 1.0}),
                           wire.CRYPTO: identity})


def delivered(reply: Message, instruction: Message) -> Message:
    """The reply as the aggregator gets it: its own RecordDict, as a network would give it (the
    aggregator takes the arrays out of replies it is done with; the site keeps what it sent)."""
    if reply.has_error():
        return reply
    return Message(RecordDict({name: ArrayRecord(dict(record)) if isinstance(record, ArrayRecord)
                               else record for name, record in reply.content.items()}),
                   reply_to=instruction)


class FakeGrid:
    """Routes each message to its site and keeps every reply the aggregator received.

    `send_and_receive` answers a round at once, as Flower's does; `push_messages` and
    `pull_messages` let a site answer only when its reply is pulled, as `StreamingGrid` pulls
    them. `keep_received=False` keeps no reply, for tests that count the replies alive.
    """

    def __init__(self, sites: Iterable[FakeSite], keep_received: bool = True) -> None:
        self.sites = {node_id: site for node_id, site in enumerate(sites, start=101)}
        self.keep_received = keep_received
        self.received: list[Message] = []
        self.pushed: dict[str, Message] = {}  # instructions not answered yet, by message id
        # What the ServerApp runtime sets before a strategy builds messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        # in node order (Flower samples in random order): tests see replies arrive the same way
        ids = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            message.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex
            self.pushed[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            if (instruction := self.pushed.pop(message_id, None)) is None:
                continue
            reply = self.sites[instruction.metadata.dst_node_id].handle(instruction)
            if self.keep_received:
                self.received.append(delivered(reply, instruction))
            replies.append(delivered(reply, instruction))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def decrypted_global(strategy: EncryptedFedAvg, key: SiteKey,
                     layout: TensorLayout) -> dict[str, np.ndarray]:
    assert strategy.current is not None
    return decrypt_global(key, strategy.global_record(), layout, strategy.current.weight_sum,
                          binding=RoundBinding(strategy.training_id, strategy.current.server_round))


def grid_error(num_sites: int, weight_sum: float = 1.0) -> float:
    """How far the exact grid mean may sit from numpy's float mean: every site's term a_k * w is
    rounded by at most STEP / 2 before the sum is divided by s (`fedhealth.core.fixed_point`)."""
    return num_sites * fixed_point.STEP / 2 / weight_sum

"""Simulated sites and a Grid fake that drive `EncryptedFedAvg` with real TenSEAL messages.

The fake only routes messages; every ciphertext is built by the site helpers in
`fedhealth.core.crypto.messages` with a real secret key.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import (
    build_census_reply,
    build_evaluate_reply,
    build_reply,
    is_census,
    read_instruction,
)


def random_tensors(seed: int, width: int = 3000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"body.weight": rng.normal(size=(width,)),
            "head.weight": rng.normal(size=(4, 7)).astype(np.float32)}


@dataclass
class FakeSite:
    """A site whose "training" pulls the global halfway towards its own target tensors."""

    name: str
    key: SiteKey
    num_examples: int
    target: dict[str, np.ndarray]
    tamper: Callable[[RecordDict], None] | None = None
    sent: list[RecordDict] = field(default_factory=list)
    seen: list[RecordDict] = field(default_factory=list)  # train/evaluate instructions received
    encrypted: list[dict[str, np.ndarray]] = field(default_factory=list)  # plaintexts sent

    def handle(self, message: Message) -> Message:
        content = self._answer(message)
        if self.tamper is not None and message.metadata.message_type == MessageType.TRAIN:
            self.tamper(content)
        self.sent.append(content)
        return Message(content, reply_to=message)

    def _answer(self, message: Message) -> RecordDict:
        if message.metadata.message_type == MessageType.QUERY:
            assert is_census(message.content)
            return build_census_reply(self.key, self.num_examples, self.name)
        self.seen.append(message.content)
        instruction = read_instruction(message.content)
        layout = TensorLayout.of(self.target)
        start = instruction.global_tensors(self.key, layout)
        if start is None:  # round 1: every site derives the same initialisation from the seed
            start = {k: np.zeros_like(v) for k, v in self.target.items()}
        if message.metadata.message_type == MessageType.EVALUATE:
            distance = sum(float(np.abs(start[k] - v).mean()) for k, v in self.target.items())
            return build_evaluate_reply(self.key, self.num_examples, {"distance": distance},
                                        self.name)
        trained = {k: (0.5 * start[k] + 0.5 * v).astype(v.dtype) for k, v in self.target.items()}
        self.encrypted.append(trained)
        return build_reply(self.key, trained, instruction.site_weight, self.num_examples,
                           {"loss": float(self.num_examples)}, self.name)


class FakeGrid:
    """Routes each message to its site and keeps every reply the aggregator received."""

    def __init__(self, sites: Iterable[FakeSite]) -> None:
        self.sites = {node_id: site for node_id, site in enumerate(sites, start=101)}
        self.received: list[Message] = []
        # What the ServerApp runtime sets before a strategy builds messages.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = [self.sites[m.metadata.dst_node_id].handle(m) for m in messages]
        self.received.extend(replies)
        return replies

"""Flower's own FedAvg for the plaintext comparison runs, fed only replies that pass the checks.

Sampling, messages and the weighted mean stay Flower's, so plaintext and encrypted runs are
directly comparable; what Flower would crash on or average blindly (an extra record, a list or
NaN metric, a zero count, arrays that do not parse or do not match) is excluded here with a
recorded reason, by the same `ReplyScreen` the encrypted strategy uses.
"""

from collections import Counter
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.run_history import EVALUATE, TRAIN, RunHistory
from strategies.reply_check import CheckedReply, Expected, ReplyRejected
from strategies.screening import ReplyScreen


def plaintext_layout(reply: CheckedReply) -> str:
    """The layout hash of a reply's `arrays`, which must parse as finite float numpy arrays."""
    tensors = {}
    for name, array in reply.content.array_records[wire.ARRAYS].items():
        try:
            tensor = array.numpy()
        except Exception as exc:  # numpy raises ValueError/EOFError/... on a bad .npy stream
            raise ReplyRejected(f"array '{name[:64]}' does not parse ({exc})") from None
        if not np.issubdtype(tensor.dtype, np.number) or not np.isfinite(tensor).all():
            raise ReplyRejected(f"array '{name[:64]}' must hold finite numbers, got "
                                f"{tensor.dtype} with non-finite or non-numeric values")
        tensors[name] = tensor
    if not tensors:
        raise ReplyRejected(f"'{wire.ARRAYS}' holds no arrays")
    return TensorLayout.of(tensors).hash


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg behind the reply checks, keeping the run's one history."""

    def __init__(self, **fedavg_kwargs: object) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.history = RunHistory()
        self.screen = ReplyScreen(self.history, fingerprint=None, training_id="")
        self._asked: dict[int, Expected] = {}
        self._layout: str | None = None  # fixed by the first aggregated round

    def _ask(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        messages = list(messages)
        self._asked = {m.metadata.dst_node_id: Expected(m.metadata.message_type, server_round, "")
                       for m in messages}
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._ask(super().configure_train(server_round, arrays, config, grid),
                         server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._ask(super().configure_evaluate(server_round, arrays, config, grid),
                         server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted mean over the checked replies in the federation's layout."""
        replies = list(replies)
        checked = self.screen.screen(replies, self._asked, MessageType.TRAIN, server_round,
                                     array_record=wire.ARRAYS)
        layouts: list[tuple[CheckedReply, str]] = []
        for reply in checked:
            try:
                layouts.append((reply, plaintext_layout(reply)))
            except ReplyRejected as exc:
                self.screen.reject(TRAIN, server_round, reply.node_id, exc)
        expected = self._layout or (Counter(h for _, h in layouts).most_common(1)[0][0]
                                    if layouts else None)
        used = []
        for reply, layout in layouts:
            if layout == expected:
                used.append(reply)
            else:
                self.screen.reject(TRAIN, server_round, reply.node_id, ReplyRejected(
                    f"arrays of layout {layout[:12]} differ from the federation's "
                    f"{str(expected)[:12]}"))
        for reply in used:
            self.screen.record(TRAIN, reply)
        self.history.round_closed(TRAIN, server_round)
        if not used:
            return None, None
        self._layout = expected
        return super().aggregate_train(server_round, _messages_of(replies, used))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        used = self.screen.screen(replies, self._asked, MessageType.EVALUATE, server_round,
                                  array_record=None)
        for reply in used:
            self.screen.record(EVALUATE, reply)
        self.history.round_closed(EVALUATE, server_round)
        if not used:
            return None
        return super().aggregate_evaluate(server_round, _messages_of(replies, used))


def _messages_of(replies: list[Message], used: list[CheckedReply]) -> list[Message]:
    """The messages whose content was accepted, for Flower's own aggregation."""
    chosen = {id(r.content) for r in used}
    return [m for m in replies if m.has_content() and id(m.content) in chosen]

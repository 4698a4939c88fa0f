"""FedAvg in plaintext for the comparison runs: the encrypted strategy's arithmetic, unencrypted.

Sampling and messages stay Flower FedAvg's (`arrays` + `config` out, `arrays` + `metrics`
back). The mean does not: it is the encrypted run's, computed the same way from the same
inputs, so both modes hand sites the same global bit for bit. Each accepted reply's shared
tensors are weighted by the site's a_k (uniform, or from the `Census` of sample counts with the
coordinator's cap, as `EncryptedFedAvg` derives them), rounded to the grid and summed exactly,
then divided by s = sum of the summed replies' a_k, all by `fedhealth.core.fixed_point`. The
aggregator sees plaintext tensors here anyway, so weighting them here rather than at the sites
discloses nothing more.

Where the encrypted census asks every sampled site before training, this one counts each site
from the `num-examples` of its first train reply (the same number a site's census reply gives):
the weights agree whenever the same sites are counted. What Flower would crash on or average
blindly (an extra record, a list or NaN metric, a zero count, arrays that do not parse or do
not match) is excluded with a recorded reason, by the same `ReplyScreen` the encrypted strategy
uses.
"""

from collections import Counter
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedhealth.core import fixed_point
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.run_history import EVALUATE, TRAIN, RunHistory
from strategies.census import Census, uniform_weights
from strategies.reply_check import CheckedReply, Expected, ReplyRejected
from strategies.screening import ReplyScreen, metric_contents


def plaintext_tensors(reply: CheckedReply) -> dict[str, np.ndarray]:
    """A reply's `arrays`, which must parse as finite numeric numpy arrays."""
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
    return tensors


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg behind the reply checks, averaging as `EncryptedFedAvg` does.

    uniform_weights, max_site_weight: as for `EncryptedFedAvg` (a_k = 1/K over the sampled
    sites, or sample-count shares with none above the cap).
    """

    def __init__(self, *, uniform_weights: bool = False, max_site_weight: float = 1.0,
                 **fedavg_kwargs: object) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.uniform_weights = uniform_weights
        self.census = Census(max_site_weight)
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
        """The a_k-weighted grid mean over the checked replies in the federation's layout."""
        checked = self.screen.screen(replies, self._asked, MessageType.TRAIN, server_round,
                                     array_record=wire.ARRAYS)
        parsed: list[tuple[CheckedReply, dict[str, np.ndarray], TensorLayout]] = []
        for reply in checked:
            try:
                tensors = plaintext_tensors(reply)
            except ReplyRejected as exc:
                self.screen.reject(TRAIN, server_round, reply.node_id, exc)
                continue
            parsed.append((reply, tensors, TensorLayout.of(tensors)))
        expected = self._layout or (Counter(layout.hash for *_, layout in parsed)
                                    .most_common(1)[0][0] if parsed else None)
        weights = self._weights([reply for reply, *_ in parsed])
        terms: list[np.ndarray] = []
        used: list[CheckedReply] = []
        layout: TensorLayout | None = None
        for reply, tensors, found in parsed:
            try:
                if found.hash != expected:
                    raise ReplyRejected(f"arrays of layout {found.hash[:12]} differ from the "
                                        f"federation's {str(expected)[:12]}")
                terms.append(self._term(found.flatten(tensors), weights[reply.node_id]))
            except ReplyRejected as exc:
                self.screen.reject(TRAIN, server_round, reply.node_id, exc)
                continue
            used.append(reply)
            layout = found
        for reply in used:
            self.screen.record(TRAIN, reply)
        self.history.round_closed(TRAIN, server_round)
        if layout is None:
            return None, None
        self._layout = expected
        average = fixed_point.mean(fixed_point.sum_on_grid(terms), fixed_point.weight_sum(
            weights[reply.node_id] for reply in used))
        arrays = ArrayRecord({name: Array(tensor)
                              for name, tensor in layout.unflatten(average).items()})
        return arrays, self.train_metrics_aggr_fn(metric_contents(used), self.weighted_by_key)

    def _weights(self, replies: list[CheckedReply]) -> dict[int, float]:
        """a_k over this round's sampled sites, counting sites not yet counted from their reply."""
        sampled = list(self._asked)
        if self.uniform_weights:
            return uniform_weights(sampled)
        counts = {reply.node_id: reply.num_examples for reply in replies}
        for node in self.census.unknown(list(counts)):
            self.census.count(node, counts[node])
        return self.census.weights(sampled)

    @staticmethod
    def _term(vector: np.ndarray, weight: float) -> np.ndarray:
        """The site's grid term a_k * w, or ReplyRejected when it cannot be summed exactly."""
        try:
            return fixed_point.on_grid(vector, weight)
        except ValueError as exc:
            raise ReplyRejected(str(exc)) from None

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

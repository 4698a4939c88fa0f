"""Continue a checkpointed run inside Flower's round loop, which always counts from round 1.

`Strategy.start` runs rounds 1..n. A run resumed after `completed` rounds must run rounds
completed+1..total: this adapter gives Flower's loop the strategy with every round shifted, so
the strategy itself only ever sees true round numbers.
"""

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class ShiftedRounds(Strategy):
    """`strategy` with Flower's round r presented to it as round r + `completed`."""

    def __init__(self, strategy: Strategy, completed: int) -> None:
        self.strategy = strategy
        self.completed = completed

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.completed, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.completed, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.completed, arrays, config,
                                                grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.completed, replies)

"""FedAvg over CKKS ciphertexts: the aggregator adds E(a_k w_k) and never sees a plaintext update.

Sites pre-multiply their shared tensors by a_k and encrypt; this strategy sums the valid
replies' ciphertexts and their a_k into E(global) and s, which sites decrypt and divide.
The encrypted global lives in the strategy (and its checkpoint), not in the `arrays` Flower's
loop passes around, so a plaintext ArrayRecord given to `start` can never be sent to a site.
Every reply goes through one `ReplyScreen`; what it accepts is the run's one record.
"""

import uuid
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedhealth.core import fixed_point
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import AggregatorKey
from fedhealth.core.run_history import EVALUATE, TRAIN, RunHistory
from strategies.census import Census, uniform_weights
from strategies.checkpoint import EncryptedGlobal, load_checkpoint, save_checkpoint, save_history
from strategies.ciphertext_sum import RunningSum, UpdateSum, declared_count, parse_ciphertexts
from strategies.parallel_sum import SumWorkers
from strategies.reply_check import (
    CheckedReply,
    Expected,
    ReplyRejected,
    ReplyVerifier,
    check_train_fields,
    release_arrays,
)
from strategies.reply_stream import StreamingGrid
from strategies.resume import ShiftedRounds
from strategies.round_fold import Layout, RoundFold
from strategies.screening import ReplyScreen, metric_contents


def sample(grid: Grid, fraction: float, minimum: int, min_available: int) -> list[int]:
    """Nodes for a round, as Flower's FedAvg samples them (`sample_nodes`); none at fraction 0."""
    if fraction == 0.0:
        return []
    size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
    nodes, _ = sample_nodes(grid, min_available, size)
    return nodes


class EncryptedFedAvg(FedAvg):
    """Flower FedAvg whose model is E(sum a_k w_k), with s = sum a_k kept beside it.

    Parameters beyond FedAvg's
    --------------------------
    key : the aggregator's params-only key (`load_aggregator_context`).
    min_replies : valid train replies needed to replace the global (default: min_train_nodes);
        with fewer, the previous global is kept.
    uniform_weights : a_k = 1/K over the sampled sites, for sites that keep counts private;
        otherwise a_k = n_k / sum n from a one-off `query` census of training sample counts.
    max_site_weight : the largest a_k any site gets from the census (run config
        `max-site-weight`); the excess goes to the other sites in proportion to their counts.
    checkpoint_dir : where E(global) and the run history are written after every round.
    resume : continue from the checkpoint in `checkpoint_dir`. Without it, an existing checkpoint
        is refused rather than silently continued or overwritten: it may hold a long run's work.
    reply_verifier : the signature hook, called as `reply_verifier(reply, training_id)` on every
        reply that passed the field checks; see `strategies.reply_check.ReplyVerifier`.
    workers : processes that parse and add ciphertexts (`strategies.parallel_sum`); 1 folds
        in the ServerApp's own process. Started by `start` (or the first train round), stopped
        by `close` (which `start` calls when its rounds end).
    """

    def __init__(self, key: AggregatorKey, *, min_replies: int | None = None,
                 uniform_weights: bool = False, max_site_weight: float = 1.0,
                 checkpoint_dir: Path | None = None, resume: bool = False,
                 reply_verifier: ReplyVerifier | None = None, workers: int = 1,
                 **fedavg_kwargs: object) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.key = key
        self.min_replies = self.min_train_nodes if min_replies is None else min_replies
        self.uniform_weights = uniform_weights
        self.census = Census(max_site_weight)
        self.checkpoint_dir = checkpoint_dir
        self.current: EncryptedGlobal | None = None
        self.history = RunHistory()
        self.training_id = uuid.uuid4().hex  # a resumed run takes its checkpoint's instead
        self._asked: dict[int, Expected] = {}  # this round's train instructions, by node
        self.workers = workers
        self._pool: SumWorkers | None = None  # started by the first sum that needs it
        if checkpoint_dir is not None and (found := load_checkpoint(checkpoint_dir)):
            if not resume:
                raise FileExistsError(
                    f"{checkpoint_dir} holds the checkpoint of round {found[0].server_round}: "
                    "set run config resume=true to continue it, or use another out-dir")
            self._resume(found[0], found[1])
        self.screen = ReplyScreen(self.history, key.fingerprint, self.training_id, reply_verifier)

    # ------------------------------------------------------------------ state
    @property
    def completed_rounds(self) -> int:
        return self.current.server_round if self.current else 0

    def global_record(self) -> ArrayRecord:
        """The current E(global) as an ArrayRecord; empty before round 1 (sites start from the seed)."""
        return wire.ciphertexts_to_record(self.current.ciphertexts) if self.current else ArrayRecord()

    def _resume(self, state: EncryptedGlobal, history: dict[str, object]) -> None:
        if state.key_fingerprint != self.key.fingerprint:
            raise ValueError(
                f"checkpoint in {self.checkpoint_dir} was made under key {state.key_fingerprint}, "
                f"this aggregator has {self.key.fingerprint}: use that federation's "
                "aggregator.ctx or another checkpoint folder"
            )
        try:
            parse_ciphertexts(self.key, state.ciphertexts)
        except ReplyRejected as exc:
            raise ValueError(f"checkpoint in {self.checkpoint_dir} is damaged ({exc}); move it "
                             "away to start a new run") from None
        self.current = state
        self.training_id = state.training_id
        self.history = RunHistory.from_json(history, f"{self.checkpoint_dir}/{wire.HISTORY_FILE}")
        log(INFO, "Resuming from the encrypted checkpoint of round %d (%d ciphertexts)",
            state.server_round, len(state.ciphertexts))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Run the rounds not yet in the checkpoint; `initial_arrays` is ignored (see module).

        Replies reach `aggregate_train` as they are pulled (`StreamingGrid`), not as the
        round's list, so the ServerApp holds the sum and one reply, not every site's.
        """
        grid = StreamingGrid(grid)
        remaining = num_rounds - self.completed_rounds
        if remaining <= 0:
            log(INFO, "All %d rounds are in the checkpoint; nothing to run", num_rounds)
            return Result(arrays=self.global_record())
        self.start_workers()
        try:
            if self.completed_rounds:  # Flower's loop counts from 1: run it over shifted rounds
                return ShiftedRounds(self, self.completed_rounds).start(
                    grid, self.global_record(), remaining, timeout, train_config,
                    evaluate_config, evaluate_fn)
            return super().start(grid, self.global_record(), remaining, timeout, train_config,
                                 evaluate_config, evaluate_fn)
        finally:
            self.close()

    def start_workers(self) -> None:
        """Start the aggregator's worker processes (if `workers` > 1) now, not in round 1."""
        if self.workers > 1 and self._pool is None:
            self._pool = SumWorkers(self.key, self.workers)

    def close(self) -> None:
        """Stop the aggregator's worker processes, if any were started."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Encryption: CKKS preset '%s', key %s, min valid replies %d, %s weights",
            self.key.preset.name, self.key.fingerprint, self.min_replies,
            "uniform" if self.uniform_weights
            else f"sample-count (at most {self.census.max_site_weight:g} per site)")

    # ------------------------------------------------------------- configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """E(global), s, and each sampled site's a_k and nonce."""
        nodes = sample(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        weights = (uniform_weights(nodes) if self.uniform_weights
                   else self._census_weights(server_round, nodes, grid, config))
        self._asked = self.screen.expect(MessageType.TRAIN, server_round, weights)
        return self._instructions(server_round, config, self._asked)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The same instruction as training; sites reply metrics only."""
        nodes = sample(grid, self.fraction_evaluate, self.min_evaluate_nodes,
                       self.min_available_nodes)
        self._asked = self.screen.expect(MessageType.EVALUATE, server_round,
                                         uniform_weights(nodes))
        return self._instructions(server_round, config, self._asked)

    def _instructions(self, server_round: int, config: ConfigRecord,
                      asked: dict[int, Expected]) -> list[Message]:
        config[wire.SERVER_ROUND] = server_round
        state = self.current
        global_record = self.global_record() if state else None
        messages = []
        for node_id, expected in asked.items():
            content = RecordDict({wire.CONFIG: config, wire.CRYPTO: ConfigRecord({
                wire.SERVER_ROUND: server_round,
                wire.WEIGHT_SUM: state.weight_sum if state else 0.0,
                wire.SITE_WEIGHT: expected.site_weight or 0.0,
                wire.LAYOUT_HASH: state.layout_hash if state else "",
                wire.FINGERPRINT: self.key.fingerprint,
                wire.TRAINING_ID: self.training_id,
                wire.NONCE: expected.nonce,
                wire.GLOBAL_ROUND: state.server_round if state else 0,
            })})
            if global_record is not None:
                content[wire.GLOBAL] = global_record
            messages.append(Message(content, node_id, expected.kind))
        return messages

    def _census_weights(self, server_round: int, nodes: list[int], grid: Grid,
                        config: ConfigRecord) -> dict[int, float]:
        """a_k from the census, asking nodes not yet counted; a node that fails sits out.

        The run config goes along: a site needs it to find and prepare its data.
        """
        if unknown := self.census.unknown(nodes):
            asked = self.screen.expect(MessageType.QUERY, 0, dict.fromkeys(unknown))  # no round
            queries = [Message(RecordDict({wire.CONFIG: config, wire.CENSUS: ConfigRecord({
                wire.FINGERPRINT: self.key.fingerprint, wire.TRAINING_ID: self.training_id,
                wire.NONCE: expected.nonce})}), node, MessageType.QUERY)
                for node, expected in asked.items()]
            for reply in self.screen.screen(grid.send_and_receive(queries), asked,
                                            MessageType.QUERY, server_round, array_record=None):
                self.census.count(reply.node_id, reply.num_examples)
                log(INFO, "census: %s trains on %d samples", reply.site, reply.num_examples)
        return self.census.weights(nodes)

    # ------------------------------------------------------------- aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold each valid reply into the sum of ciphertexts and a_k as it comes out of
        `replies` (`strategies.round_fold`); keep the old global below min_replies."""
        quantization = self.key.preset.quantization
        fold = RoundFold(self._new_sum, self._layout(), lambda reply, exc: self.screen.reject(
            TRAIN, server_round, reply.node_id, exc),
            max_updates=quantization.max_sites if quantization else None)
        for reply in self.screen.screened(replies, self._asked, MessageType.TRAIN, server_round,
                                          array_record=wire.UPDATE):
            try:
                layout_hash = check_train_fields(reply, self._asked[reply.node_id])
                count = declared_count(self.key, reply.content[wire.UPDATE])  # type: ignore[arg-type]
            except ReplyRejected as exc:
                self.screen.reject(TRAIN, server_round, reply.node_id, exc)
                release_arrays(reply.content)
                continue
            fold.add(reply, (layout_hash, count))
            del reply  # folded and released, or held by `fold`: not kept alive by this loop
        folded = fold.close()
        used = list(folded.used) if folded else []
        _log_refused_globals(TRAIN, server_round, used)
        for reply in used:
            self.screen.record(TRAIN, reply)
        self.history.round_closed(TRAIN, server_round)
        metrics = self._metrics(TRAIN, used)
        if folded is None or len(used) < self.min_replies:
            log(WARNING, "round %d: %d valid replies, %d needed: keeping the previous global "
                "(round %d)", server_round, len(used), self.min_replies, self.completed_rounds)
            return None, metrics
        chunk_sizes = folded.total.chunk_sizes
        self.current = EncryptedGlobal(
            server_round=server_round, ciphertexts=folded.total.ciphertexts(),
            weight_sum=fixed_point.weight_sum(self._asked[r.node_id].site_weight or 0.0
                                              for r in used),
            layout_hash=folded.layout_hash, chunk_sizes=chunk_sizes,
            key_fingerprint=self.key.fingerprint, training_id=self.training_id)
        log(INFO, "round %d: new encrypted global from %d sites, s = %.6f", server_round,
            len(used), self.current.weight_sum)
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.current)
            save_history(self.checkpoint_dir, self.history.to_json())
        return self.global_record(), metrics

    def _layout(self) -> Layout | None:
        """The layout every reply must declare: the current global's (None in round 1)."""
        return (self.current.layout_hash, len(self.current.chunk_sizes)) if self.current else None

    def _new_sum(self) -> UpdateSum:
        expected = self.current.chunk_sizes if self.current else None
        if self.workers < 2:
            return RunningSum(self.key, expected)
        self.start_workers()
        assert self._pool is not None
        return self._pool.new_sum(expected)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Record each valid reply's metrics and return their weighted mean."""
        accepted = self.screen.screen(replies, self._asked, MessageType.EVALUATE, server_round,
                                      array_record=None)
        _log_refused_globals(EVALUATE, server_round, accepted)
        for reply in accepted:
            self.screen.record(EVALUATE, reply)
        self.history.round_closed(EVALUATE, server_round)
        if self.checkpoint_dir is not None and self.current is not None:
            save_history(self.checkpoint_dir, self.history.to_json())
        return self._metrics(EVALUATE, accepted)

    def _metrics(self, kind: str, replies: list[CheckedReply]) -> MetricRecord | None:
        """The `num-examples`-weighted mean of checked metrics (every count is at least 1)."""
        if not replies:
            return None
        aggregate = self.train_metrics_aggr_fn if kind == TRAIN else self.evaluate_metrics_aggr_fn
        return aggregate(metric_contents(replies), self.weighted_by_key)


def _log_refused_globals(kind: str, server_round: int, replies: list[CheckedReply]) -> None:
    """Sites say when a global failed its check values (and that they used their last accepted
    one); the aggregator cannot decrypt to see which reply spoiled it, so it says which round."""
    for reply in replies:
        if refused := reply.refused_global:  # checked, and kept in the run history
            log(WARNING, "round %d %s: site %s refused the global of round %d (its check values "
                "failed) and used the last global it accepted", server_round, kind, reply.site,
                refused)

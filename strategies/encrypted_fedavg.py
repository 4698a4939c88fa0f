"""FedAvg over CKKS ciphertexts: the aggregator adds E(a_k w_k) and never sees a plaintext update.

Sites pre-multiply their shared tensors by a_k and encrypt; this strategy sums the valid
replies' ciphertexts and their a_k into E(global) and s, which sites decrypt and divide.
The encrypted global lives in the strategy (and its checkpoint), not in the `arrays` Flower's
loop passes around, so a plaintext ArrayRecord given to `start` can never be sent to a site.
"""

import math
import uuid
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import AggregatorKey
from fedhealth.core.run_history import SiteMetrics
from strategies.checkpoint import EncryptedGlobal, load_checkpoint, save_checkpoint, save_history
from strategies.reply_check import (
    ReplyRejected,
    SiteReply,
    SiteUpdate,
    check_reply,
    check_update,
    parse_ciphertexts,
    site_label,
)


class EncryptedFedAvg(FedAvg):
    """Flower FedAvg whose model is E(sum a_k w_k), with s = sum a_k kept beside it.

    Parameters beyond FedAvg's
    --------------------------
    key : the aggregator's params-only key (`load_aggregator_context`).
    min_replies : valid train replies needed to replace the global (default: min_train_nodes);
        with fewer, the previous global is kept.
    uniform_weights : a_k = 1/K over the sampled sites, for sites that keep counts private;
        otherwise a_k = n_k / sum n from a one-off `query` census of training sample counts.
    checkpoint_dir : where E(global) is written after every round.
    resume : continue from the checkpoint in `checkpoint_dir`. Without it, an existing checkpoint
        is refused rather than silently continued or overwritten: it may hold a long run's work.
    """

    def __init__(self, key: AggregatorKey, *, min_replies: int | None = None,
                 uniform_weights: bool = False, checkpoint_dir: Path | None = None,
                 resume: bool = False,
                 **fedavg_kwargs: object) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.key = key
        self.min_replies = self.min_train_nodes if min_replies is None else min_replies
        self.uniform_weights = uniform_weights
        self.checkpoint_dir = checkpoint_dir
        self.sample_counts: dict[int, int] = {}
        self.history: dict[str, dict[int, SiteMetrics]] = {"train": {}, "evaluate": {}}
        self.current: EncryptedGlobal | None = None
        self._weights: dict[int, float] = {}
        self.training_id = uuid.uuid4().hex  # a resumed run takes its checkpoint's instead
        self._round_offset = 0
        if checkpoint_dir is not None and (found := load_checkpoint(checkpoint_dir)):
            if not resume:
                raise FileExistsError(
                    f"{checkpoint_dir} holds the checkpoint of round {found[0].server_round}: "
                    "set run config resume=true to continue it, or use another out-dir")
            self._resume(*found)

    # ------------------------------------------------------------------ state
    @property
    def completed_rounds(self) -> int:
        return self.current.server_round if self.current else 0

    def initial_arrays(self) -> ArrayRecord:
        """E(global) to start from: the checkpoint's, or empty (sites start from the seed)."""
        return wire.ciphertexts_to_record(self.current.ciphertexts) if self.current else ArrayRecord()

    def _resume(self, state: EncryptedGlobal, history: dict) -> None:
        if state.key_fingerprint != self.key.fingerprint:
            raise ValueError(
                f"checkpoint in {self.checkpoint_dir} was made under key {state.key_fingerprint}, "
                f"this aggregator has {self.key.fingerprint}: use that federation's "
                "aggregator.ctx or another checkpoint folder"
            )
        parse_ciphertexts(self.key, state.ciphertexts)
        self.current = state
        self.training_id = state.training_id
        self.history.update({kind: {int(r): sites for r, sites in rounds.items()}
                             for kind, rounds in history.items()})
        log(INFO, "Resuming from the encrypted checkpoint of round %d (%d ciphertexts)",
            state.server_round, len(state.ciphertexts))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              **kwargs: object) -> Result:
        """Run the rounds not yet in the checkpoint; `initial_arrays` is ignored (see module)."""
        remaining = num_rounds - self.completed_rounds
        if remaining <= 0:
            log(INFO, "All %d rounds are in the checkpoint; nothing to run", num_rounds)
            return Result(arrays=self.initial_arrays())
        self._round_offset = self.completed_rounds
        try:
            return super().start(grid, self.initial_arrays(), remaining, **kwargs)  # type: ignore[arg-type]
        finally:
            self._round_offset = 0

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Encryption: CKKS preset '%s', key %s, min valid replies %d, %s weights",
            self.key.preset.name, self.key.fingerprint, self.min_replies,
            "uniform" if self.uniform_weights else "sample-count")

    # ------------------------------------------------------------- configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """E(global), s and each sampled site's a_k."""
        nodes = [m.metadata.dst_node_id for m in super().configure_train(
            server_round, arrays, config, grid)]
        self._weights = self._site_weights(nodes, grid, config)
        return self._instructions(server_round, config, MessageType.TRAIN, self._weights)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The same instruction as training; sites reply metrics only."""
        nodes = [m.metadata.dst_node_id for m in super().configure_evaluate(
            server_round, arrays, config, grid)]
        weights = dict.fromkeys(nodes, 1.0 / len(nodes)) if nodes else {}
        return self._instructions(server_round, config, MessageType.EVALUATE, weights)

    def _instructions(self, server_round: int, config: ConfigRecord, message_type: str,
                      weights: dict[int, float]) -> list[Message]:
        server_round += self._round_offset
        config[wire.SERVER_ROUND] = server_round
        state = self.current
        messages = []
        global_record = self.initial_arrays() if state else None
        for node_id, weight in weights.items():
            content = RecordDict({wire.CONFIG: config, wire.CRYPTO: ConfigRecord({
                wire.SERVER_ROUND: server_round,
                wire.WEIGHT_SUM: state.weight_sum if state else 0.0,
                wire.SITE_WEIGHT: weight,
                wire.LAYOUT_HASH: state.layout_hash if state else "",
                wire.FINGERPRINT: self.key.fingerprint,
                wire.TRAINING_ID: self.training_id,
            })})
            if global_record is not None:
                content[wire.GLOBAL] = global_record
            messages.append(Message(content, node_id, message_type))
        return messages

    def _site_weights(self, nodes: list[int], grid: Grid, config: ConfigRecord
                      ) -> dict[int, float]:
        """a_k for the sampled nodes: uniform, or n_k / sum n from the census."""
        if self.uniform_weights or not nodes:
            return dict.fromkeys(nodes, 1.0 / len(nodes)) if nodes else {}
        self._census([n for n in nodes if n not in self.sample_counts], grid, config)
        counted = [n for n in nodes if n in self.sample_counts]
        total = sum(self.sample_counts[n] for n in counted)
        if total == 0:
            return dict.fromkeys(counted, 1.0 / len(counted)) if counted else {}
        return {n: self.sample_counts[n] / total for n in counted}

    def _census(self, nodes: list[int], grid: Grid, config: ConfigRecord) -> None:
        """Ask new nodes once for their training sample count; a node that fails sits out.

        The run config goes along: a site needs it to find and prepare its data.
        """
        if not nodes:
            return
        query = RecordDict({wire.CONFIG: config,
                            wire.CENSUS: ConfigRecord({wire.FINGERPRINT: self.key.fingerprint})})
        for reply in grid.send_and_receive([Message(query, n, MessageType.QUERY) for n in nodes]):
            try:
                answer = check_reply(reply, self.key)
            except ReplyRejected as exc:
                log(WARNING, "census: %s sits out this round: %s", site_label(reply), exc)
                continue
            self.sample_counts[answer.node_id] = answer.num_examples
            log(INFO, "census: %s trains on %d samples", site_label(reply), answer.num_examples)

    # ------------------------------------------------------------- aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the valid replies' ciphertexts and a_k; keep the old global below min_replies."""
        server_round += self._round_offset
        updates = self._valid_updates(server_round, list(replies))
        metrics = self._metrics(server_round, "train", [u.reply for u in updates],
                                self.train_metrics_aggr_fn)
        if len(updates) < self.min_replies:
            log(WARNING, "round %d: %d valid replies, %d needed: keeping the previous global "
                "(round %d)", server_round, len(updates), self.min_replies, self.completed_rounds)
            return None, metrics
        total = updates[0].vectors  # freshly parsed and ours: sum into them in place
        for update in updates[1:]:
            for acc, vector in zip(total, update.vectors, strict=True):
                acc.add_(vector)
        self.current = EncryptedGlobal(
            server_round=server_round, ciphertexts=[v.serialize() for v in total],
            weight_sum=math.fsum(self._weights[u.reply.node_id] for u in updates),  # any order
            layout_hash=updates[0].layout_hash, chunk_sizes=updates[0].chunk_sizes,
            key_fingerprint=self.key.fingerprint, training_id=self.training_id)
        log(INFO, "round %d: new encrypted global from %d sites, s = %.6f", server_round,
            len(updates), self.current.weight_sum)
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, self.current)
        return self.initial_arrays(), metrics

    def _valid_updates(self, server_round: int, replies: list[Message]) -> list[SiteUpdate]:
        """Checked updates in one layout: the current global's, or in the first round the
        layout most replies share (ties go to the first reply)."""
        candidates: list[SiteUpdate] = []
        expected: tuple[str, tuple[int, ...]] | None = None
        for message in replies:
            try:
                if message.has_error():  # a dropout's reply comes from the SuperLink, not the node
                    raise ReplyRejected(f"the site reported an error: {message.error.reason}")
                weight = self._weights.get(message.metadata.src_node_id)
                if weight is None:
                    raise ReplyRejected("this node was not sampled for the round")
                candidates.append(check_update(message, self.key, weight))
            except ReplyRejected as exc:
                log(WARNING, "round %d: excluded %s: %s", server_round, site_label(message), exc)
        if self.current is not None:
            expected = (self.current.layout_hash, self.current.chunk_sizes)
        elif candidates:
            expected = Counter((u.layout_hash, u.chunk_sizes) for u in candidates).most_common(1)[0][0]
        valid = []
        for update in candidates:
            if (update.layout_hash, update.chunk_sizes) == expected:
                valid.append(update)
            else:
                log(WARNING, "round %d: excluded node %d (site %s): layout %s with %d slots "
                    "differs from the federation's %s with %d slots", server_round,
                    update.reply.node_id, update.reply.site, update.layout_hash[:12],
                    sum(update.chunk_sizes), expected[0][:12], sum(expected[1]))
        return valid

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Weighted plaintext metrics of the replies that pass the checks."""
        server_round += self._round_offset
        valid = []
        for message in replies:
            try:
                valid.append(check_reply(message, self.key))
            except ReplyRejected as exc:
                log(WARNING, "round %d evaluate: excluded %s: %s", server_round,
                    site_label(message), exc)
        return self._metrics(server_round, "evaluate", valid, self.evaluate_metrics_aggr_fn)

    def _metrics(self, server_round: int, kind: str, replies: list[SiteReply],
                 aggregate: object) -> MetricRecord | None:
        """Record each site's metrics, then weight them by `num-examples`."""
        self.history[kind][server_round] = {
            r.site: {k: v for k, v in r.content.metric_records[wire.METRICS].items()}
            for r in replies
        }
        if self.checkpoint_dir is not None:
            save_history(self.checkpoint_dir, self.history)
        if not replies:
            return None
        return aggregate([r.content for r in replies], self.weighted_by_key)  # type: ignore[operator]

"""Each round's intake of replies: one reply per asked node, checked once, recorded once.

The screen knows what the aggregator asked whom this round (`Expected`, with a fresh nonce per
node), holds each node to the site name it first answered with (so no node can write another
site's record), runs the field checks and the optional signature hook, and records every
refusal in the run history with its reason. Both the encrypted and the plaintext strategy use it.
"""

import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore import log

from fedhealth.core.crypto import wire
from fedhealth.core.run_history import EVALUATE, TRAIN, Rejection, RunHistory, SiteRecord
from strategies.reply_check import (
    CheckedReply,
    Expected,
    ReplyRejected,
    ReplyVerifier,
    check_reply,
    release_arrays,
)

CENSUS = "census"  # the kind a census rejection is recorded under
KIND_OF = {MessageType.TRAIN: TRAIN, MessageType.EVALUATE: EVALUATE, MessageType.QUERY: CENSUS}


@dataclass
class ReplyScreen:
    """Checks, binds and records the replies of one strategy's rounds.

    fingerprint: the federation key's (None in plaintext runs, whose replies state none).
    verifier: the signature hook (`strategies.reply_check.ReplyVerifier`), or None.
    """

    history: RunHistory
    fingerprint: str | None
    training_id: str
    verifier: ReplyVerifier | None = None
    site_of_node: dict[int, str] = field(default_factory=dict)
    node_of_site: dict[str, int] = field(default_factory=dict)

    def expect(self, message_type: str, server_round: int,
               weights: Mapping[int, float | None]) -> dict[int, Expected]:
        """What each node is asked this round, with a fresh random nonce for each."""
        return {node: Expected(message_type, server_round, secrets.token_hex(16), weight)
                for node, weight in weights.items()}

    def screen(self, replies: Iterable[Message], expected: Mapping[int, Expected],
               message_type: str, server_round: int, *,
               array_record: str | None) -> list[CheckedReply]:
        """Every reply `screened` passes, as a list (for replies that carry metrics only)."""
        return list(self.screened(replies, expected, message_type, server_round,
                                  array_record=array_record))

    def screened(self, replies: Iterable[Message], expected: Mapping[int, Expected],
                 message_type: str, server_round: int, *,
                 array_record: str | None) -> Iterator[CheckedReply]:
        """The replies that pass every check, the first one per asked node, each as soon as it
        comes out of `replies` (a stream keeps one reply alive at a time); the rest are
        recorded as rejections. `array_record`: as for `check_reply`."""
        seen: set[int] = set()
        for message in replies:
            node = message.metadata.src_node_id
            try:
                asked = expected.get(node)
                if asked is None or asked.kind != message_type:
                    raise ReplyRejected(f"node {node} was not asked for a {message_type} reply "
                                        f"in round {server_round}")
                if node in seen:
                    raise ReplyRejected("a second reply from this node in the same round")
                seen.add(node)
                reply = check_reply(message, asked, fingerprint=self.fingerprint,
                                    array_record=array_record)
                if self.verifier is not None:
                    self.verifier(reply, self.training_id)
                self._bind(node, reply.site)
            except ReplyRejected as exc:
                self.reject(KIND_OF.get(message_type, message_type), server_round, node, exc)
                if message.has_content():
                    release_arrays(message.content)
                continue
            del message  # not held while the consumer folds this reply and the next is pulled
            yield reply
            del reply

    def reject(self, kind: str, server_round: int, node: int, error: ReplyRejected) -> None:
        """Record (and log) that `node`'s reply was excluded, and why."""
        site = self.site_of_node.get(node)
        log(WARNING, "round %d %s: excluded node %d (site %s): %s", server_round, kind, node,
            site or "unknown", error)
        self.history.reject(Rejection(kind, server_round, node, site, str(error)))

    def record(self, kind: str, reply: CheckedReply) -> None:
        """Keep an accepted reply as the round's one record for its site."""
        self.history.record(kind, reply.server_round, SiteRecord(
            reply.site, reply.num_examples, reply.metrics,
            reply.uplink_bytes if kind == TRAIN else 0, reply.refused_global))

    def _bind(self, node: int, site: str) -> None:
        """Hold a node to its first site name, and a site name to its first node."""
        bound = self.site_of_node.get(node)
        if bound is not None and bound != site:
            raise ReplyRejected(f"node {node} answered as site {bound!r} before, now "
                                f"names {site!r}")
        owner = self.node_of_site.get(site)
        if owner is not None and owner != node:
            raise ReplyRejected(f"site {site!r} is node {owner}; node {node} cannot answer "
                                "for it")
        self.site_of_node[node] = site
        self.node_of_site[site] = node


def metric_contents(replies: Iterable[CheckedReply]) -> list[RecordDict]:
    """Checked metrics as the RecordDicts Flower's metric aggregation functions take."""
    return [RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: r.num_examples,
                                                    **r.metrics})}) for r in replies]

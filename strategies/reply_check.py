"""Type and range checks on every field of a site's reply, before the aggregator uses any of it.

A reply is untrusted input: each record must be the one expected, each field the expected type
and inside its range, each metric a finite scalar. What passes becomes a `CheckedReply`; anything
else raises `ReplyRejected` naming the field, and the strategy excludes that site for the round.
Nothing here parses a ciphertext (`strategies.ciphertext_sum` does, after these checks).
"""

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedhealth.core.crypto import wire

MAX_NUM_EXAMPLES = 10**8
"""Largest sample count a reply may state: no hospital holds 10^8 labelled images for one model;
more is an error or an attempt to take over the weighted mean (the coordinator's cap,
`max-site-weight`, bounds a_k below this)."""
MAX_METRICS = 32
SITE_NAME = re.compile(r"[\w.-][\w .-]{0,62}[\w.-]|[\w.-]")
"""1-64 letters, digits, `.`, `-`, `_` or inner spaces: a name that is safe in logs and JSON."""
LAYOUT_HASH = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


class ReplyRejected(ValueError):
    """A reply cannot be used; the message names the field and what was wrong with it."""


@dataclass(frozen=True)
class Expected:
    """What the aggregator asked one node this round; a reply is checked against it."""

    kind: str  # "train", "evaluate" or "query" (Flower's MessageType)
    server_round: int  # the aggregator's own count (the census runs inside a train round)
    nonce: str  # the fresh random hex string this node's instruction carried
    site_weight: float | None = None  # the a_k sent, for train replies


@dataclass(frozen=True)
class CheckedReply:
    """A reply whose fields all passed their checks, with the round context the aggregator holds.

    `site` comes from the reply's `fh.crypto` record (as the reply states it: a verifier
    checks it against that site's key); `server_round`, `nonce` and `site_weight` (the a_k
    sent, train replies only) are the aggregator's, never read from the reply. `content` is
    the reply itself, for a `ReplyVerifier` that needs more (a signature, the ciphertext bytes).
    """

    kind: str
    node_id: int
    site: str
    server_round: int
    nonce: str
    num_examples: int
    metrics: Mapping[str, float]
    site_weight: float | None
    refused_global: int  # the round of a global the site refused (failed check values), or 0
    uplink_bytes: int  # bytes of every array the reply carried (ciphertexts, or tensors)
    content: RecordDict = field(repr=False, compare=False)

    def released(self) -> "CheckedReply":
        """The same facts without the content (whose arrays `release_arrays` drops): what a
        folded reply leaves behind, so a round holds one reply's bytes at a time."""
        release_arrays(self.content)
        return replace(self, content=RecordDict())


def release_arrays(content: RecordDict) -> None:
    """Take the arrays out of a reply the aggregator is done with, so their bytes go now.

    Each `RecordDict.array_records` view Flower builds holds the RecordDict and its
    ArrayRecords in a reference cycle, so a reply any code viewed that way is only freed by
    the cyclic garbage collector, rounds later for one that lived through a fold: every
    site's update would pile up (measured: all 6 of a 6-site round alive at its end). So the
    aggregator never builds that view of a reply (`array_records_of`, or a record by name),
    and taken out of the dict here, an ArrayRecord goes at once.
    """
    for name, _ in array_records_of(content):
        del content[name]


def array_records_of(content: RecordDict) -> list[tuple[str, ArrayRecord]]:
    """The ArrayRecords in `content` by name, without building a `.array_records` view."""
    return [(name, record) for name, record in content.items() if isinstance(record, ArrayRecord)]


ReplyVerifier = Callable[[CheckedReply, str], None]
"""The hook where a signature check plugs in: `verifier(reply, training_id)` returns None for a
reply it accepts and raises `ReplyRejected` (saying why) for any other. It is called once per
train, evaluate and census reply, after every field check and before any ciphertext is parsed
or any record kept, so a reply it refuses costs no parsing and leaves no trace but its
rejection. `reply.nonce` is the nonce the aggregator sent that node for that round."""


def check_reply(message: Message, expected: Expected, *, fingerprint: str | None,
                array_record: str | None) -> CheckedReply:
    """The checks every reply needs: records present and no others, site name, key, metrics.

    `fingerprint`: the federation key's, which encrypted replies must state (None: plaintext).
    `array_record`: the ArrayRecord a train reply carries (`fh.update`, or `arrays` in
    plaintext), None for replies that carry metrics only.
    """
    if message.has_error():  # a dropout's reply comes from the SuperLink, not the node
        raise ReplyRejected(f"the site reported an error: {message.error.reason}")
    if not message.has_content():
        raise ReplyRejected("the reply has no content")
    content = message.content
    records: dict[str, type] = {wire.CRYPTO: ConfigRecord, wire.METRICS: MetricRecord}
    if array_record is not None:
        records[array_record] = ArrayRecord
    _check_records(content, records)
    crypto = content.config_records[wire.CRYPTO]
    site = _field(crypto, wire.SITE, str)
    if not SITE_NAME.fullmatch(site):
        raise ReplyRejected(f"'{wire.SITE}' must be 1-64 letters, digits, '.', '-', '_' or "
                            f"inner spaces, got {site[:80]!r}")
    if fingerprint is not None:
        stated = _field(crypto, wire.FINGERPRINT, str)
        if stated != fingerprint:
            raise ReplyRejected(f"encrypted under another federation's key (fingerprint "
                                f"{stated[:64]!r}, this federation uses {fingerprint})")
    num_examples, metrics = check_metrics(content.metric_records[wire.METRICS])
    refused = crypto.get(wire.REFUSED_GLOBAL, 0)
    if type(refused) is not int or not 0 <= refused <= expected.server_round:
        raise ReplyRejected(f"'{wire.REFUSED_GLOBAL}' must be a round in "
                            f"0..{expected.server_round}, got {_shown(refused)}")
    return CheckedReply(expected.kind, message.metadata.src_node_id, site,
                        expected.server_round, expected.nonce, num_examples, metrics,
                        expected.site_weight, refused, _array_bytes(content), content)


def _array_bytes(content: RecordDict) -> int:
    """Bytes of every array in `content`, as declared by each Array (nothing parsed)."""
    return sum(len(array.data) for _, record in array_records_of(content)
               for array in record.values())


def check_train_fields(reply: CheckedReply, expected: Expected) -> str:
    """An encrypted train reply's `site-weight` (the a_k sent) and `layout-hash`; returns the hash."""
    crypto = reply.content.config_records[wire.CRYPTO]
    layout_hash = _field(crypto, wire.LAYOUT_HASH, str)
    if not LAYOUT_HASH.fullmatch(layout_hash):
        raise ReplyRejected(f"'{wire.LAYOUT_HASH}' must be 64 lowercase hex digits, got "
                            f"{layout_hash[:80]!r}")
    used = _field(crypto, wire.SITE_WEIGHT, float)
    assert expected.site_weight is not None, "train replies are checked against the a_k sent"
    if not math.isclose(used, expected.site_weight, rel_tol=1e-9, abs_tol=1e-12):
        raise ReplyRejected(f"multiplied by weight {used}, the aggregator sent "
                            f"{expected.site_weight}")
    return layout_hash


def check_metrics(record: MetricRecord) -> tuple[int, Mapping[str, float]]:
    """`num-examples` as an int in 1..MAX_NUM_EXAMPLES, and the other metrics as finite floats."""
    if wire.NUM_EXAMPLES not in record:
        raise ReplyRejected(f"'{wire.METRICS}' lacks '{wire.NUM_EXAMPLES}'")
    num_examples = record[wire.NUM_EXAMPLES]
    if (not isinstance(num_examples, int) or isinstance(num_examples, bool)
            or not 1 <= num_examples <= MAX_NUM_EXAMPLES):
        raise ReplyRejected(f"'{wire.NUM_EXAMPLES}' must be an int in 1..{MAX_NUM_EXAMPLES}, "
                            f"got {_shown(num_examples)}")
    if len(record) > MAX_METRICS + 1:
        raise ReplyRejected(f"'{wire.METRICS}' has {len(record)} entries, at most "
                            f"{MAX_METRICS + 1} allowed")
    metrics: dict[str, float] = {}
    for name, value in record.items():
        if name == wire.NUM_EXAMPLES:
            continue
        if len(name) > 64:
            raise ReplyRejected(f"metric name {name[:64]!r}... is longer than 64 characters")
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not math.isfinite(value)):
            raise ReplyRejected(f"metric '{name}' must be a finite number, got {_shown(value)}")
        metrics[name] = float(value)
    return num_examples, MappingProxyType(metrics)


def _check_records(content: RecordDict, records: Mapping[str, type]) -> None:
    """Exactly the expected records, each of its kind: no extra, none missing."""
    extra = sorted(set(content) - set(records))
    if extra:
        raise ReplyRejected(f"unexpected record '{extra[0][:64]}' (a reply carries exactly "
                            f"{', '.join(sorted(records))})")
    for name, kind in records.items():
        if name not in content:
            raise ReplyRejected(f"missing {kind.__name__} '{name}'")
        if not isinstance(content[name], kind):
            raise ReplyRejected(f"'{name}' must be a {kind.__name__}, got "
                                f"{type(content[name]).__name__}")


def _field(record: ConfigRecord, name: str, kind: type[T]) -> T:
    """`record[name]` when it has the type asked for (an int counts as a finite float)."""
    if name not in record:
        raise ReplyRejected(f"missing field '{name}'")
    value = record[name]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)  # type: ignore[return-value]
    elif isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise ReplyRejected(f"field '{name}' must be a {'finite ' if kind is float else ''}"
                        f"{kind.__name__}, got {_shown(value)}")


def _shown(value: object) -> str:
    """A value for an error message: its type and at most 60 characters of it."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"

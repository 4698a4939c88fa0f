"""Checks on what a site sends the aggregator; a failed check names the reason.

Everything here works with the params-only context: it can parse and add ciphertexts,
never decrypt them.
"""

import math
from dataclasses import dataclass

import tenseal as ts
from flwr.app import Message, RecordDict

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import AggregatorKey


class ReplyRejected(ValueError):
    """A reply cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class SiteReply:
    """A reply that passed the checks every reply needs (train, evaluate, census)."""

    node_id: int
    site: str
    content: RecordDict
    num_examples: int


@dataclass(frozen=True)
class SiteUpdate:
    """A train reply whose ciphertexts parsed: E(a_k w_k) ready to add."""

    reply: SiteReply
    vectors: list[ts.CKKSVector]
    layout_hash: str

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Slots used per ciphertext (two values each with complex slots)."""
        return tuple(v.size() for v in self.vectors)


def site_label(message: Message) -> str:
    """`node N (site S)` for log lines, with the site name when the reply carries one."""
    node = f"node {message.metadata.src_node_id}"
    if message.has_content():
        crypto = message.content.config_records.get(wire.CRYPTO)
        if crypto is not None and isinstance(crypto.get(wire.SITE), str):
            return f"{node} (site {crypto[wire.SITE]})"
    return node


def check_reply(message: Message, key: AggregatorKey) -> SiteReply:
    """Content present, same federation key, a site name and a usable `num-examples`."""
    if message.has_error():
        raise ReplyRejected(f"the site reported an error: {message.error.reason}")
    content = message.content
    crypto = content.config_records.get(wire.CRYPTO)
    if crypto is None:
        raise ReplyRejected(f"missing ConfigRecord '{wire.CRYPTO}'")
    fingerprint = crypto.get(wire.FINGERPRINT)
    if fingerprint is None:
        raise ReplyRejected(f"missing field '{wire.FINGERPRINT}'")
    if fingerprint != key.fingerprint:
        raise ReplyRejected(f"encrypted under another federation's key (fingerprint "
                            f"{fingerprint}, this federation uses {key.fingerprint})")
    metrics = content.metric_records.get(wire.METRICS)
    if metrics is None:
        raise ReplyRejected(f"missing MetricRecord '{wire.METRICS}'")
    num_examples = metrics.get(wire.NUM_EXAMPLES)
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 0:
        raise ReplyRejected(f"'{wire.NUM_EXAMPLES}' must be a non-negative int, "
                            f"got {num_examples!r}")
    site = crypto.get(wire.SITE, f"node-{message.metadata.src_node_id}")
    return SiteReply(message.metadata.src_node_id, str(site), content, num_examples)


def check_update(message: Message, key: AggregatorKey, site_weight: float) -> SiteUpdate:
    """A train reply: the common checks, the a_k it used, and ciphertexts that parse."""
    reply = check_reply(message, key)
    crypto = reply.content.config_records[wire.CRYPTO]
    for name in (wire.LAYOUT_HASH, wire.SITE_WEIGHT):
        if name not in crypto:
            raise ReplyRejected(f"missing field '{name}'")
    used = float(crypto[wire.SITE_WEIGHT])  # type: ignore[arg-type]
    if not math.isclose(used, site_weight, rel_tol=1e-9, abs_tol=1e-12):
        raise ReplyRejected(f"multiplied by weight {used}, the aggregator sent {site_weight}")
    record = reply.content.array_records.get(wire.UPDATE)
    if record is None:
        raise ReplyRejected(f"missing ArrayRecord '{wire.UPDATE}'")
    try:
        blobs = wire.record_to_ciphertexts(record)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    if not blobs:
        raise ReplyRejected("no ciphertexts")
    return SiteUpdate(reply, parse_ciphertexts(key, blobs), str(crypto[wire.LAYOUT_HASH]))


def parse_ciphertexts(key: AggregatorKey, blobs: list[bytes]) -> list[ts.CKKSVector]:
    """Deserialize with the params-only context and check each ciphertext can be added.

    A fresh ciphertext of this preset has 2 polynomials at the data level, the preset's
    scale and at most N/2 values; anything else would make the sum fail or overflow.
    """
    preset = key.preset
    data_primes = len(preset.coeff_mod_bit_sizes) - 1
    max_bytes = 2 * preset.poly_modulus_degree * data_primes * 8 + 4096  # uncompressed + header
    vectors = []
    for i, blob in enumerate(blobs):
        if not 0 < len(blob) <= max_bytes:
            raise ReplyRejected(f"ciphertext {i} has {len(blob)} bytes, expected 1..{max_bytes}")
        try:
            vector = ts.ckks_vector_from(key.context, blob)
            (ciphertext,) = vector.ciphertext()
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad streams
            raise ReplyRejected(f"ciphertext {i} does not deserialize ({exc})") from None
        if (ciphertext.size() != 2 or ciphertext.coeff_modulus_size() != data_primes
                or ciphertext.scale != preset.scale or ciphertext.is_transparent()
                or not 0 < vector.size() <= preset.slots):
            raise ReplyRejected(f"ciphertext {i} is not a fresh '{preset.name}' ciphertext "
                                f"(scale {ciphertext.scale:g}, "
                                f"{ciphertext.coeff_modulus_size()} primes, "
                                f"{vector.size()} values)")
        vectors.append(vector)
    return vectors

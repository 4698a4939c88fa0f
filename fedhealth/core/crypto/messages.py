"""Site-side reading of the aggregator's instructions and building of replies.

Record names are documented in `fedhealth.core.crypto.wire`. Only `sites/` imports this module.
Every reply is signed with the site's signing key when it has one (`signing.ReplyFacts` says
what a signature covers); an update's check values bind it to the round it answers.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import RoundBinding, decrypt_global, encrypt_update
from fedhealth.core.crypto.keys import SigningKey, SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.signing import ReplyFacts, ciphertext_digest

T = TypeVar("T")


class InstructionError(ValueError):
    """An instruction from the aggregator is incomplete or meant for another federation."""


@dataclass(frozen=True)
class Instruction:
    """What a train/evaluate message asks of a site."""

    server_round: int
    global_record: ArrayRecord | None  # None in round 1: start from the run seed
    weight_sum: float
    site_weight: float
    layout_hash: str  # "" until the aggregator has seen a first round
    key_fingerprint: str
    training_id: str  # the same across a coordinator's restarts (resume), unlike Flower's run id
    config: ConfigRecord
    nonce: str = ""  # fresh per site and round: what this site's signed reply binds to
    global_round: int = 0  # the round whose replies `global_record` sums (0 without one)

    @property
    def binding(self) -> RoundBinding:
        """What an update answering this instruction binds its check values to."""
        return RoundBinding(self.training_id, self.server_round)

    def check(self, key: SiteKey, layout: TensorLayout) -> None:
        """Refuse an instruction for another federation's key or another model's layout."""
        if self.key_fingerprint != key.fingerprint:
            raise InstructionError(
                f"the aggregator uses key {self.key_fingerprint}, this site has "
                f"{key.fingerprint}: install the site.ctx of this federation"
            )
        if self.layout_hash and self.layout_hash != layout.hash:
            raise InstructionError(
                f"the global model has layout {self.layout_hash[:12]}, this site's shared "
                f"tensors have {layout.hash[:12]}: check the model and personalization policy"
            )

    def global_tensors(self, key: SiteKey, layout: TensorLayout) -> dict[str, np.ndarray] | None:
        """Checked and decrypted shared tensors, or None in round 1.

        Raises `codec.IntegrityError` when the global fails its check values or lies off the
        grid `fixed_point` rounds updates to.
        """
        self.check(key, layout)
        if self.global_record is None:
            return None
        if not 0 < self.global_round <= self.server_round:  # evaluate: this round's global
            raise InstructionError(f"the global of round {self.global_round} cannot be sent in "
                                   f"round {self.server_round}")
        return decrypt_global(key, self.global_record, layout, self.weight_sum,
                              binding=RoundBinding(self.training_id, self.global_round))


def read_instruction(content: RecordDict) -> Instruction:
    """Parse a train or evaluate message's content; a missing or mistyped field names itself."""
    if wire.CRYPTO not in content.config_records:
        raise InstructionError(f"instruction lacks record '{wire.CRYPTO}': aggregator and site "
                               "run different fedhealth versions?")
    crypto = content.config_records[wire.CRYPTO]
    return Instruction(
        server_round=_field(crypto, wire.SERVER_ROUND, int),
        global_record=content.array_records.get(wire.GLOBAL),
        weight_sum=float(_field(crypto, wire.WEIGHT_SUM, float)),
        site_weight=float(_field(crypto, wire.SITE_WEIGHT, float)),
        layout_hash=_field(crypto, wire.LAYOUT_HASH, str),
        key_fingerprint=_field(crypto, wire.FINGERPRINT, str),
        training_id=_field(crypto, wire.TRAINING_ID, str),
        config=content.config_records.get(wire.CONFIG, ConfigRecord()),
        nonce=_field(crypto, wire.NONCE, str, ""),  # without one, no signature can verify
        global_round=_field(crypto, wire.GLOBAL_ROUND, int, 0),
    )


def _field(record: ConfigRecord, name: str, kind: type[T], default: T | None = None) -> T:
    """`record[name]` of type `kind` (an int passes for a float), else InstructionError."""
    if name not in record:
        if default is not None:
            return default
        raise InstructionError(f"instruction lacks field '{name}': aggregator and site run "
                               "different fedhealth versions?")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise InstructionError(f"instruction field '{name}' must be a {kind.__name__}, got "
                               f"{type(value).__name__}")
    return value  # type: ignore[return-value]  # an int where a float was asked


def build_reply(key: SiteKey, instruction: Instruction, tensors: Mapping[str, np.ndarray],
                num_examples: int, metrics: Mapping[str, float], site: str, *,
                signer: SigningKey | None = None, refused_global: int = 0,
                received: Mapping[str, np.ndarray] | None = None) -> RecordDict:
    """A train reply: E(a_k * tensors) with check values for this round, plaintext metrics,
    layout hash, key fingerprint, and the signature over what it states.

    `refused_global`: the round of a global this site refused (failed check values), 0 if none.
    `received`: the global the site trained from (`codec.encrypt_update`), None in round 1.
    """
    weight = instruction.site_weight
    update = encrypt_update(key, tensors, weight, binding=instruction.binding, received=received)
    crypto = ConfigRecord({
        wire.SITE: site, wire.FINGERPRINT: key.fingerprint,
        wire.LAYOUT_HASH: TensorLayout.of(tensors).hash, wire.SITE_WEIGHT: float(weight),
    })
    facts = ReplyFacts(MessageType.TRAIN, instruction.training_id, instruction.server_round,
                       instruction.nonce, site, ciphertext_digest(wire.record_to_ciphertexts(update)),
                       int(num_examples), float(weight))
    return _signed(RecordDict({wire.UPDATE: update,
                               wire.METRICS: metric_record(num_examples, metrics),
                               wire.CRYPTO: crypto}), facts, signer, refused_global)


def build_evaluate_reply(key: SiteKey, instruction: Instruction, num_examples: int,
                         metrics: Mapping[str, float], site: str, *,
                         signer: SigningKey | None = None, refused_global: int = 0) -> RecordDict:
    """An evaluate reply: plaintext metrics only, signed."""
    facts = ReplyFacts(MessageType.EVALUATE, instruction.training_id, instruction.server_round,
                       instruction.nonce, site, "", int(num_examples), 0.0)
    return _signed(_metrics_reply(key, num_examples, metrics, site), facts, signer,
                   refused_global)


def is_census(content: RecordDict) -> bool:
    """True for the aggregator's `query` asking for this site's training sample count."""
    return wire.CENSUS in content.config_records


@dataclass(frozen=True)
class CensusQuery:
    """The aggregator's `query` for this site's training sample count."""

    training_id: str
    nonce: str


def read_census(content: RecordDict) -> CensusQuery:
    """The census a `query` message asks for (see `is_census`)."""
    census = content.config_records[wire.CENSUS]
    return CensusQuery(str(census.get(wire.TRAINING_ID, "")), str(census.get(wire.NONCE, "")))


def build_census_reply(key: SiteKey, query: CensusQuery, num_examples: int, site: str, *,
                       signer: SigningKey | None = None) -> RecordDict:
    """The census answer: the training sample count n_k the aggregator derives a_k from.

    A census belongs to no round a site can know of, so its signature carries round 0.
    """
    facts = ReplyFacts(MessageType.QUERY, query.training_id, 0, query.nonce, site, "",
                       int(num_examples), 0.0)
    return _signed(_metrics_reply(key, num_examples, {}, site), facts, signer, 0)


def _metrics_reply(key: SiteKey, num_examples: int, metrics: Mapping[str, float],
                   site: str) -> RecordDict:
    return RecordDict({
        wire.METRICS: metric_record(num_examples, metrics),
        wire.CRYPTO: ConfigRecord({wire.SITE: site, wire.FINGERPRINT: key.fingerprint}),
    })


def _signed(content: RecordDict, facts: ReplyFacts, signer: SigningKey | None,
            refused_global: int) -> RecordDict:
    crypto = content.config_records[wire.CRYPTO]
    if refused_global:
        crypto[wire.REFUSED_GLOBAL] = int(refused_global)
    if signer is not None:
        crypto[wire.SIGNATURE] = signer.sign(facts)
    return content


def metric_record(num_examples: int, metrics: Mapping[str, float]) -> MetricRecord:
    """`num-examples` (what aggregation weighs by) and the site's plaintext metrics."""
    return MetricRecord({wire.NUM_EXAMPLES: int(num_examples),
                         **{k: float(v) for k, v in metrics.items()}})

"""Site-side reading of the aggregator's instructions and building of replies.

Record names are documented in `fedhealth.core.crypto.wire`. Only `sites/` imports this module.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import decrypt_global, encrypt_update
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout


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
        """Checked and decrypted shared tensors, or None in round 1."""
        self.check(key, layout)
        if self.global_record is None:
            return None
        return decrypt_global(key, self.global_record, layout, self.weight_sum)


def read_instruction(content: RecordDict) -> Instruction:
    """Parse a train or evaluate message's content; a missing field names itself."""
    try:
        crypto = content.config_records[wire.CRYPTO]
        return Instruction(
            server_round=int(crypto[wire.SERVER_ROUND]),
            global_record=content.array_records.get(wire.GLOBAL),
            weight_sum=float(crypto[wire.WEIGHT_SUM]),
            site_weight=float(crypto[wire.SITE_WEIGHT]),
            layout_hash=str(crypto[wire.LAYOUT_HASH]),
            key_fingerprint=str(crypto[wire.FINGERPRINT]),
            training_id=str(crypto[wire.TRAINING_ID]),
            config=content.config_records.get(wire.CONFIG, ConfigRecord()),
        )
    except KeyError as exc:
        raise InstructionError(f"instruction lacks field {exc}: aggregator and site run "
                               "different fedhealth versions?") from None


def build_reply(key: SiteKey, tensors: Mapping[str, np.ndarray], weight: float,
                num_examples: int, metrics: Mapping[str, float], site: str) -> RecordDict:
    """A train reply: E(weight * tensors), plaintext metrics, layout hash and key fingerprint."""
    return RecordDict({
        wire.UPDATE: encrypt_update(key, tensors, weight),
        wire.METRICS: metric_record(num_examples, metrics),
        wire.CRYPTO: ConfigRecord({
            wire.SITE: site, wire.FINGERPRINT: key.fingerprint,
            wire.LAYOUT_HASH: TensorLayout.of(tensors).hash, wire.SITE_WEIGHT: float(weight),
        }),
    })


def build_evaluate_reply(key: SiteKey, num_examples: int, metrics: Mapping[str, float],
                         site: str) -> RecordDict:
    """An evaluate reply: plaintext metrics only."""
    return RecordDict({
        wire.METRICS: metric_record(num_examples, metrics),
        wire.CRYPTO: ConfigRecord({wire.SITE: site, wire.FINGERPRINT: key.fingerprint}),
    })


def is_census(content: RecordDict) -> bool:
    """True for the aggregator's `query` asking for this site's training sample count."""
    return wire.CENSUS in content.config_records


def build_census_reply(key: SiteKey, num_examples: int, site: str) -> RecordDict:
    """The census answer: the training sample count n_k the aggregator derives a_k from."""
    return build_evaluate_reply(key, num_examples, {}, site)


def metric_record(num_examples: int, metrics: Mapping[str, float]) -> MetricRecord:
    """`num-examples` (what aggregation weighs by) and the site's plaintext metrics."""
    return MetricRecord({wire.NUM_EXAMPLES: int(num_examples),
                         **{k: float(v) for k, v in metrics.items()}})

"""How a site reads the aggregator's message and words its reply, encrypted or not.

Encrypted runs speak `fedhealth.core.crypto.messages` (E(global) in, E(a_k * shared) out). Plaintext
runs speak Flower FedAvg's format (`arrays` + `config` in, `arrays` + `metrics` out) so they can
be compared with the same training code. Every reply names its site in `fh.crypto` (plaintext
replies carry that record with the site name alone), never anything about patients.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.keys import SiteKey, load_site_context
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import (
    Instruction,
    build_evaluate_reply,
    build_reply,
    metric_record,
    read_instruction,
)

Arrays = dict[str, np.ndarray]
PLAIN_ARRAYS = wire.ARRAYS
PLAIN_CONFIG = wire.CONFIG
PLAIN_METRICS = wire.METRICS


class Exchange(Protocol):
    """One message from the aggregator, and how to answer it."""

    server_round: int

    def personal_key(self, run_id: int) -> str:
        """What this site's personal layers are stored under for this training."""

    def global_shared(self, layout: TensorLayout) -> Arrays | None:
        """The global model's shared tensors, or None when sites start from the seed."""

    def train_reply(self, shared: Arrays, num_examples: int, metrics: Mapping[str, float],
                    site: str) -> RecordDict:
        """The reply carrying this site's shared tensors."""

    def evaluate_reply(self, num_examples: int, metrics: Mapping[str, float],
                       site: str) -> RecordDict:
        """The reply carrying only metrics."""


@lru_cache(maxsize=4)
def cached_site_key(path: Path) -> SiteKey:
    """Load a site key once per process: parsing a TenSEAL context is not free."""
    return load_site_context(path)


@dataclass
class EncryptedExchange:
    """CKKS messages: decrypt E(global)/s here, encrypt a_k * shared before it leaves."""

    key: SiteKey
    instruction: Instruction

    @classmethod
    def read(cls, content: RecordDict, key_file: Path) -> "EncryptedExchange":
        return cls(cached_site_key(key_file), read_instruction(content))

    @property
    def server_round(self) -> int:
        return self.instruction.server_round

    def personal_key(self, run_id: int) -> str:
        # Flower's run id changes when the coordinator resumes from a checkpoint; this does not
        return self.instruction.training_id

    def global_shared(self, layout: TensorLayout) -> Arrays | None:
        return self.instruction.global_tensors(self.key, layout)

    def train_reply(self, shared: Arrays, num_examples: int, metrics: Mapping[str, float],
                    site: str) -> RecordDict:
        return build_reply(self.key, shared, self.instruction.site_weight, num_examples,
                           metrics, site)

    def evaluate_reply(self, num_examples: int, metrics: Mapping[str, float],
                       site: str) -> RecordDict:
        return build_evaluate_reply(self.key, num_examples, metrics, site)


@dataclass
class PlaintextExchange:
    """Flower FedAvg's messages, for the plaintext comparison runs."""

    content: RecordDict

    @property
    def server_round(self) -> int:
        return int(self.content[PLAIN_CONFIG]["server-round"])  # type: ignore[arg-type]

    def personal_key(self, run_id: int) -> str:
        return str(run_id)  # plaintext runs have no checkpoint to resume from

    def global_shared(self, layout: TensorLayout) -> Arrays | None:
        record = self.content.array_records.get(PLAIN_ARRAYS)
        if not record:
            return None
        arrays = {name: array.numpy() for name, array in record.items()}
        if TensorLayout.of(arrays).hash != layout.hash:
            raise ValueError("the global model's tensors do not match this site's model: "
                             "check the model and personalization policy in the run config")
        return arrays

    def train_reply(self, shared: Arrays, num_examples: int, metrics: Mapping[str, float],
                    site: str) -> RecordDict:
        return RecordDict({PLAIN_ARRAYS: ArrayRecord({n: Array(t) for n, t in shared.items()}),
                           PLAIN_METRICS: metric_record(num_examples, metrics),
                           wire.CRYPTO: ConfigRecord({wire.SITE: site})})

    def evaluate_reply(self, num_examples: int, metrics: Mapping[str, float],
                       site: str) -> RecordDict:
        return RecordDict({PLAIN_METRICS: metric_record(num_examples, metrics),
                           wire.CRYPTO: ConfigRecord({wire.SITE: site})})


def read_run_config(content: RecordDict) -> RunConfig:
    """The run config every message from the aggregator carries (both exchanges send it)."""
    if PLAIN_CONFIG not in content.config_records:
        raise ValueError("message has no run config record: aggregator and site run "
                         "different fedhealth versions?")
    return RunConfig.from_flower(content.config_records[PLAIN_CONFIG])


def read_exchange(content: RecordDict, config: RunConfig, key_file: Path) -> Exchange:
    """The exchange a message speaks, as its run config says."""
    if config.encrypted:
        return EncryptedExchange.read(content, key_file)
    return PlaintextExchange(content)

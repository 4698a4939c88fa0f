"""How a site reads the aggregator's message and words its reply, encrypted or not.

Encrypted runs speak `fedhealth.core.crypto.messages` (E(global) in, E(a_k * shared) out, each
reply signed with the site's signing key). A global that fails its check values is refused: the
site trains and evaluates from the last global it accepted (kept in its state folder under the
training id; the run seed's model if there is none) and its reply says which round it refused,
so the aggregator knows. Plaintext runs speak Flower FedAvg's format (`arrays` + `config` in,
`arrays` + `metrics` out) so they can be compared with the same training code; the global they
receive is the aggregator's grid mean (`fedhealth.core.fixed_point`), the same bits an encrypted
site decrypts, so the two modes train identically. Every reply names its site in `fh.crypto`
(plaintext replies carry that record with the site name alone), never anything about patients.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import IntegrityError
from fedhealth.core.crypto.keys import SigningKey, SiteKey, load_site_context
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import (
    Instruction,
    build_census_reply,
    build_evaluate_reply,
    build_reply,
    metric_record,
    read_census,
    read_instruction,
)
from sites.personal_store import ACCEPTED_GLOBAL, PersonalStore
from sites.site_settings import SiteSettings

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
PLAIN_ARRAYS = wire.ARRAYS
PLAIN_CONFIG = wire.CONFIG
PLAIN_METRICS = wire.METRICS


class Exchange(Protocol):
    """One message from the aggregator, and how to answer it."""

    @property
    def server_round(self) -> int:
        """The round the aggregator says this message belongs to."""

    def personal_key(self, run_id: int) -> str:
        """What this site's personal layers are stored under for this training."""

    @property
    def site_weight(self) -> float:
        """This site's a_k in this round's sum (what its DP noise share is sized by)."""

    def global_shared(self, layout: TensorLayout) -> Arrays | None:
        """The global model's shared tensors, or None when sites start from the seed."""

    @property
    def received(self) -> Instruction | None:
        """The instruction as it arrived, E(global) still encrypted: what the site files to
        export the round's model later (sites.round_archive); None in plaintext runs, whose
        globals are comparison runs' and are not kept."""

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


@lru_cache(maxsize=16)
def _cached_signing_key(path: Path, site: str) -> SigningKey:
    return SigningKey.load(path, site)


def signing_key(site: SiteSettings) -> SigningKey | None:
    """The site's signing key, or None when it has none (an aggregator that checks signatures
    then refuses its replies)."""
    return _cached_signing_key(site.signing_key, site.name) if site.signing_key else None


@dataclass
class EncryptedExchange:
    """CKKS messages: decrypt and check E(global)/s here, encrypt a_k * shared before it leaves."""

    key: SiteKey
    instruction: Instruction
    signer: SigningKey | None
    accepted: PersonalStore  # the last global this site accepted, for this training
    refused_global: int = 0  # the round of a global refused in this exchange, 0 if none
    received_global: Arrays | None = None  # what `global_shared` gave: a quantized preset's ranges

    @classmethod
    def read(cls, content: RecordDict, site: SiteSettings,
             state: RecordDict | None) -> "EncryptedExchange":
        instruction = read_instruction(content)
        accepted = PersonalStore(state, site.state_dir, run_key=instruction.training_id,
                                 site=site.name, kind=ACCEPTED_GLOBAL)
        return cls(cached_site_key(site.key_file), instruction, signing_key(site), accepted)

    @property
    def server_round(self) -> int:
        return self.instruction.server_round

    @property
    def received(self) -> Instruction | None:
        return self.instruction

    @property
    def site_weight(self) -> float:
        return self.instruction.site_weight

    def personal_key(self, run_id: int) -> str:
        # Flower's run id changes when the coordinator resumes from a checkpoint; this does not
        return self.instruction.training_id

    def global_shared(self, layout: TensorLayout) -> Arrays | None:
        """The checked global, or after a failed check the last one accepted (None: the seed's)."""
        try:
            tensors = self.instruction.global_tensors(self.key, layout)
        except IntegrityError as exc:
            self.refused_global = self.instruction.global_round
            logger.error("round %d: refused the global of round %d, using the last accepted "
                         "one: %s", self.server_round, self.refused_global, exc)
            self.received_global = self.accepted.load()
            return self.received_global
        if tensors is not None:
            self.accepted.save(tensors)
        self.received_global = tensors
        return tensors

    def train_reply(self, shared: Arrays, num_examples: int, metrics: Mapping[str, float],
                    site: str) -> RecordDict:
        return build_reply(self.key, self.instruction, shared, num_examples, metrics, site,
                           signer=self.signer, refused_global=self.refused_global,
                           received=self.received_global)

    def evaluate_reply(self, num_examples: int, metrics: Mapping[str, float],
                       site: str) -> RecordDict:
        return build_evaluate_reply(self.key, self.instruction, num_examples, metrics, site,
                                    signer=self.signer, refused_global=self.refused_global)


@dataclass
class PlaintextExchange:
    """Flower FedAvg's messages, for the plaintext comparison runs."""

    content: RecordDict
    expected_sites: int = 0  # the run config's: sites a plaintext sum is made of

    @property
    def server_round(self) -> int:
        return int(self.content[PLAIN_CONFIG]["server-round"])  # type: ignore[arg-type]

    @property
    def site_weight(self) -> float:
        """Flower's messages carry no a_k: with uniform weights and every expected site in the
        sum it is 1 / expected-sites, the a_k an encrypted run of the same sites sends."""
        if self.expected_sites < 1:
            raise ValueError("plaintext runs with client-level DP need run config "
                             "'expected-sites' (the number of sites): it sizes each site's "
                             "noise share")
        return 1.0 / self.expected_sites

    @property
    def received(self) -> Instruction | None:
        return None

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


def read_exchange(content: RecordDict, config: RunConfig, site: SiteSettings,
                  state: RecordDict | None) -> Exchange:
    """The exchange a message speaks, as its run config says; `state` is `Context.state`."""
    if config.encrypted:
        return EncryptedExchange.read(content, site, state)
    return PlaintextExchange(content, config.expected_sites)


def census_reply(content: RecordDict, site: SiteSettings, num_examples: int) -> RecordDict:
    """The signed answer to the aggregator's census (`messages.is_census(content)`)."""
    return build_census_reply(cached_site_key(site.key_file), read_census(content),
                              num_examples, site.name, signer=signing_key(site))

"""Encrypted and plaintext FedAvg hand sites the same global, bit for bit, round after round.

Real strategies, real TenSEAL ciphertexts and Flower messages, sites faked by the strategy
harness (no training, no Ray): what `test_federation` shows end to end, here for each weighting.
"""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedhealth.core import fixed_point
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import load_aggregator_context
from fedhealth.core.crypto.codec import RoundBinding, decrypt_global
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from strategies.encrypted_fedavg import EncryptedFedAvg
from strategies.plaintext_fedavg import CheckedFedAvg
from tests.strategy_harness import FakeGrid, FakeSite, PlainSite, random_tensors

COUNTS = (20, 21, 70)
ROUNDS = 3
Globals = list[dict[str, np.ndarray]]


def _grid(site_key: SiteKey, site: type[FakeSite]) -> FakeGrid:
    return FakeGrid([site(f"h{k}", site_key, n, random_tensors(k)) for k, n in enumerate(COUNTS)])


def _encrypted_globals(strategy: EncryptedFedAvg, site_key: SiteKey) -> Globals:
    grid = _grid(site_key, FakeSite)
    layout = TensorLayout.of(random_tensors(0))
    found = []
    for server_round in range(1, ROUNDS + 1):
        strategy.aggregate_train(server_round, grid.send_and_receive(
            strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)))
        assert strategy.current is not None
        found.append(decrypt_global(site_key, strategy.global_record(), layout,
                                    strategy.current.weight_sum,
                                    binding=RoundBinding(strategy.training_id, server_round)))
    return found


def _plaintext_globals(strategy: CheckedFedAvg, site_key: SiteKey) -> Globals:
    grid = _grid(site_key, PlainSite)
    arrays = ArrayRecord()
    found = []
    for server_round in range(1, ROUNDS + 1):
        new, _ = strategy.aggregate_train(server_round, grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid)))
        assert new is not None
        arrays = new
        found.append({name: array.numpy() for name, array in arrays.items()})
    return found


@pytest.mark.parametrize(("weighting", "shares"), [
    ({}, COUNTS),
    ({"uniform_weights": True}, (1, 1, 1)),
    ({"max_site_weight": 0.4}, (0.6 * 20 / 41, 0.6 * 21 / 41, 0.4)),  # 70/111 capped at 0.4
], ids=["census", "uniform", "capped"])
def test_both_modes_give_the_same_global_bit_for_bit(
        site_key: SiteKey, key_dir: Path, weighting: dict[str, object],
        shares: tuple[float, ...]) -> None:
    sizes = dict(min_train_nodes=3, min_available_nodes=3, min_evaluate_nodes=3)
    encrypted = _encrypted_globals(EncryptedFedAvg(
        load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE), **weighting, **sizes),
        site_key)
    plaintext = _plaintext_globals(CheckedFedAvg(**weighting, **sizes), site_key)
    for server_round, (got, expected) in enumerate(zip(encrypted, plaintext, strict=True), 1):
        assert list(got) == list(expected)
        for name in got:
            assert got[name].dtype == expected[name].dtype
            assert got[name].tobytes() == expected[name].tobytes(), (server_round, name)
    # the weights are the ones asked for: round 1 pulls each site halfway from zero
    mean = np.average([0.5 * random_tensors(k)["body.weight"] for k in range(3)], axis=0,
                      weights=shares)
    np.testing.assert_allclose(plaintext[0]["body.weight"], mean, rtol=0, atol=2 * fixed_point.STEP)

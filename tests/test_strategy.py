"""EncryptedFedAvg with real TenSEAL ciphertexts: sums, exclusions, minimum replies, resume."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from strategy_harness import (
    FakeGrid,
    FakeSite,
    decrypted_global,
    grid_error,
    only,
    random_tensors,
)

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import encrypt_update
from fedhealth.core.crypto.keys import (
    SiteKey,
    init_key_files,
    load_aggregator_context,
    load_site_context,
)
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.presets import PRESETS
from fedhealth.core.crypto.wire import CHECKPOINT_FILE
from strategies.encrypted_fedavg import EncryptedFedAvg


def make_keys(directory: Path) -> SiteKey:
    init_key_files(directory)
    return load_site_context(directory / wire.SITE_KEY_FILE)


def rejected(strategy: EncryptedFedAvg, kind: str = "train") -> dict[str | None, str]:
    """Site name (None if the reply named none) -> recorded reason, for one kind of reply."""
    return {r.site: r.reason for r in strategy.history.rejections if r.kind == kind}


def strategy_for(key_dir: Path, sites: int, **kwargs: object) -> EncryptedFedAvg:
    kwargs.setdefault("min_replies", 2)
    return EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                           min_train_nodes=sites, min_available_nodes=sites,
                           min_evaluate_nodes=sites, **kwargs)  # type: ignore[arg-type]


def one_round(strategy: EncryptedFedAvg, grid: FakeGrid, server_round: int = 1
              ) -> ArrayRecord | None:
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return arrays


@pytest.mark.parametrize("num_sites", [3, 5, 8])
def test_decrypted_aggregate_is_numpys_weighted_mean(key_dir: Path, site_key: SiteKey,
                                                     num_sites: int) -> None:
    counts = [7 + 13 * k * k for k in range(num_sites)]  # unequal weights
    sites = [FakeSite(f"h{k}", site_key, counts[k], random_tensors(k)) for k in range(num_sites)]
    grid = FakeGrid(sites)
    strategy = strategy_for(key_dir, num_sites)
    assert one_round(strategy, grid) is not None
    assert strategy.current is not None and abs(strategy.current.weight_sum - 1.0) < 1e-12
    got = decrypted_global(strategy, site_key, TensorLayout.of(sites[0].target))
    for name in sites[0].target:  # round 1 trains from zeros: each site sends 0.5 * target
        expected = np.average([0.5 * s.target[name].astype(np.float64) for s in sites],
                              axis=0, weights=counts)
        assert np.max(np.abs(got[name] - expected)) <= grid_error(num_sites)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_holds_the_mean_of_eight_large_updates(tmp_path: Path, preset: str) -> None:
    """|a_k w_k| up to 10 at every site (up to a quantized preset's range), 8 sites: still within
    the grid's rounding of numpy's weighted mean (the quantizer's bound)."""
    init_key_files(tmp_path, preset)
    key = load_site_context(tmp_path / wire.SITE_KEY_FILE)
    counts = [5 + 31 * k for k in range(8)]
    quantization = key.preset.quantization
    limit = 20 if quantization is None else 2 * quantization.largest  # sites send 0.5 * target
    targets = [{name: np.clip(20 * t, -limit, limit) for name, t in random_tensors(k).items()}
               for k in range(8)]
    sites = [FakeSite(f"h{k}", key, counts[k], targets[k]) for k in range(8)]
    strategy = strategy_for(tmp_path, 8)
    assert one_round(strategy, FakeGrid(sites)) is not None
    got = decrypted_global(strategy, key, TensorLayout.of(targets[0]))
    for name in targets[0]:
        expected = np.average([0.5 * t[name].astype(np.float64) for t in targets], axis=0,
                              weights=counts)
        assert np.max(np.abs(got[name] - expected)) <= (
            grid_error(8) if quantization is None else quantization.mean_error(8, 1.0))


def test_uniform_weights_need_no_census(key_dir: Path, site_key: SiteKey) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10 * (k + 1), random_tensors(k)) for k in range(3)]
    grid = FakeGrid(sites)
    strategy = strategy_for(key_dir, 3, uniform_weights=True)
    one_round(strategy, grid)
    assert all(m.metadata.message_type != "query" for m in grid.received)
    got = decrypted_global(strategy, site_key, TensorLayout.of(sites[0].target))
    expected = np.mean([0.5 * s.target["body.weight"] for s in sites], axis=0)
    assert np.max(np.abs(got["body.weight"] - expected)) <= grid_error(3)


def truncate_first_ciphertext(content: RecordDict) -> None:
    record = content.array_records[wire.UPDATE]
    blobs = wire.record_to_ciphertexts(record)
    content[wire.UPDATE] = wire.ciphertexts_to_record([blobs[0][:-500], *blobs[1:]])


def encrypt_under(stranger: SiteKey) -> Callable[[RecordDict], None]:
    """A reply re-encrypted under another federation's key (a misconfigured site)."""
    def tamper(content: RecordDict) -> None:
        content[wire.UPDATE] = encrypt_update(stranger, random_tensors(0), 0.1)
        content.config_records[wire.CRYPTO][wire.FINGERPRINT] = stranger.fingerprint
    return tamper


def drop_layout_hash(content: RecordDict) -> None:
    del content.config_records[wire.CRYPTO][wire.LAYOUT_HASH]


def test_bad_replies_are_excluded_and_the_round_completes(
        key_dir: Path, site_key: SiteKey, tmp_path: Path) -> None:
    stranger = make_keys(tmp_path / "other-federation")
    good = [FakeSite(f"good{k}", site_key, 20 + k, random_tensors(k)) for k in range(2)]
    bad = [
        FakeSite("stranger", site_key, 30, random_tensors(5),
                 tamper=only("train", edit=encrypt_under(stranger))),
        FakeSite("truncated", site_key, 30, random_tensors(6),
                 tamper=only("train", edit=truncate_first_ciphertext)),
        FakeSite("reshaped", site_key, 30, random_tensors(7, width=2999)),
        FakeSite("incomplete", site_key, 30, random_tensors(8),
                 tamper=only("train", edit=drop_layout_hash)),
    ]
    grid = FakeGrid(good + bad)
    strategy = strategy_for(key_dir, len(grid.sites))
    assert one_round(strategy, grid) is not None
    reasons = rejected(strategy)
    assert reasons["stranger"].startswith("encrypted under another federation's key")
    assert reasons["truncated"].startswith("ciphertext 0 does not deserialize")
    assert reasons["reshaped"].startswith("layout")
    assert reasons["incomplete"] == "missing field 'layout-hash'"
    got = decrypted_global(strategy, site_key, TensorLayout.of(good[0].target))
    expected = np.average([0.5 * s.target["body.weight"] for s in good], axis=0, weights=[20, 21])
    assert strategy.current is not None
    assert np.max(np.abs(got["body.weight"] - expected)) <= grid_error(
        2, strategy.current.weight_sum)
    assert set(strategy.history.sites("train", 1)) == {"good0", "good1"}


def test_census_leaves_out_a_site_of_another_federation(
        key_dir: Path, site_key: SiteKey, tmp_path: Path) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10, random_tensors(k)) for k in range(2)]
    sites.append(FakeSite("stranger", make_keys(tmp_path / "other"), 10, random_tensors(2)))
    grid = FakeGrid(sites)
    strategy = strategy_for(key_dir, 3)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 102]
    [rejection] = strategy.history.rejections
    assert (rejection.kind, rejection.node_id) == ("census", 103)
    assert rejection.reason.startswith("encrypted under another federation's key")


def test_wrong_layout_loses_against_the_majority(key_dir: Path, site_key: SiteKey) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10, random_tensors(k)) for k in range(3)]
    sites.append(FakeSite("odd", site_key, 10, random_tensors(9, width=5000)))
    strategy = strategy_for(key_dir, 4)
    one_round(strategy, FakeGrid(sites))
    assert set(rejected(strategy)) == {"odd"}
    assert set(strategy.history.sites("train", 1)) == {"h0", "h1", "h2"}
    assert strategy.current is not None and len(strategy.current.chunk_sizes) == 1


def test_too_few_valid_replies_keep_the_previous_global(key_dir: Path, site_key: SiteKey) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10, random_tensors(k)) for k in range(3)]
    grid = FakeGrid(sites)
    strategy = strategy_for(key_dir, 3, min_replies=3)
    one_round(strategy, grid)
    before = strategy.current
    sites[2].tamper = only("train", edit=drop_layout_hash)
    sites[1].tamper = only("train", edit=truncate_first_ciphertext)
    assert one_round(strategy, grid, 2) is None
    assert strategy.current is before


def run(key_dir: Path, sites: list[FakeSite], rounds: int, checkpoint: Path) -> EncryptedFedAvg:
    strategy = strategy_for(key_dir, len(sites), checkpoint_dir=checkpoint, resume=True)
    strategy.start(FakeGrid(sites), ArrayRecord(), num_rounds=rounds,
                   train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    return strategy


def test_resume_from_checkpoint_equals_uninterrupted_run(key_dir: Path, site_key: SiteKey,
                                                         tmp_path: Path) -> None:
    def sites() -> list[FakeSite]:
        return [FakeSite(f"h{k}", site_key, 10 + 5 * k, random_tensors(k)) for k in range(3)]

    layout = TensorLayout.of(sites()[0].target)
    whole = run(key_dir, sites(), 4, tmp_path / "whole")

    stopped = run(key_dir, sites(), 2, tmp_path / "resumed")  # the coordinator stops after round 2
    assert (tmp_path / "resumed" / CHECKPOINT_FILE).exists()
    restarted_sites = sites()
    resumed = run(key_dir, restarted_sites, 4, tmp_path / "resumed")  # rounds 3 and 4 only
    # sites key their personal layers by the training id: a resumed run must keep it
    assert resumed.training_id == stopped.training_id != whole.training_id
    told = {str(c[wire.CRYPTO][wire.TRAINING_ID]) for site in restarted_sites for c in site.seen}
    assert told == {stopped.training_id}

    assert whole.current is not None and resumed.current is not None
    assert resumed.current.server_round == whole.current.server_round == 4
    assert resumed.current.weight_sum == whole.current.weight_sum
    a = decrypted_global(whole, site_key, layout)
    b = decrypted_global(resumed, site_key, layout)
    for name in a:  # CKKS encryption is randomised: equal up to its ~1e-9 noise, which may
        # flip the last bit of a float32 tensor
        tolerance = max(1e-8, float(np.finfo(a[name].dtype).eps))
        assert np.max(np.abs(a[name].astype(np.float64) - b[name])) <= tolerance
    assert sorted(resumed.history.records["train"]) == [1, 2, 3, 4]
    assert sorted(resumed.history.records["evaluate"]) == [1, 2, 3, 4]
    assert resumed.history.sites("evaluate", 4).keys() == whole.history.sites("evaluate", 4).keys()
    assert resumed.history.sites("train", 1) == stopped.history.sites("train", 1)


def test_checkpoint_of_another_federation_is_refused(key_dir: Path, site_key: SiteKey,
                                                     tmp_path: Path) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10, random_tensors(k)) for k in range(2)]
    run(key_dir, sites, 1, tmp_path / "ckpt")
    make_keys(tmp_path / "other")
    with pytest.raises(ValueError, match="made under key"):
        strategy_for(tmp_path / "other", 2, checkpoint_dir=tmp_path / "ckpt", resume=True)


def test_existing_checkpoint_is_not_continued_unless_asked(key_dir: Path, site_key: SiteKey,
                                                           tmp_path: Path) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10, random_tensors(k)) for k in range(2)]
    run(key_dir, sites, 1, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="checkpoint of round 1: set run config resume=true"):
        strategy_for(key_dir, 2, checkpoint_dir=tmp_path / "ckpt")

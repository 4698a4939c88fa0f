"""Streamed folding and the parallel sum: replies folded as they are pulled, one alive at a time,
bad ones still excluded mid-stream, and the sum over worker processes the serial sum bit for bit."""

import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
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
from strategies.ciphertext_sum import RunningSum
from strategies.encrypted_fedavg import EncryptedFedAvg
from strategies.parallel_sum import SumWorkers
from strategies.reply_check import ReplyRejected
from strategies.reply_stream import StreamingGrid

WIDTH = 10_000  # three ciphertexts of the default preset: a reply can fail in its middle


class CountingGrid(FakeGrid):
    """Counts, at each train reply it delivers, how many delivered updates are still alive
    (the update's ArrayRecord: what holds the ciphertext bytes)."""

    def __init__(self, sites: list[FakeSite]) -> None:
        super().__init__(sites, keep_received=False)
        self.alive: list[weakref.ref[ArrayRecord]] = []
        self.peaks: list[int] = []

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = super().pull_messages(message_ids)
        for reply in replies:
            if wire.UPDATE in reply.content:
                self.alive.append(weakref.ref(cast(ArrayRecord, reply.content[wire.UPDATE])))
                self.peaks.append(sum(ref() is not None for ref in self.alive))
        return replies


def sites_of(site_key: SiteKey, count: int) -> list[FakeSite]:
    return [FakeSite(f"h{k}", site_key, 10 + 7 * k, random_tensors(k, width=WIDTH))
            for k in range(count)]


def strategy(key_dir: Path, sites: int, **kwargs: object) -> EncryptedFedAvg:
    return EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                           min_train_nodes=sites, min_available_nodes=sites,
                           min_evaluate_nodes=sites, min_replies=2,
                           **kwargs)  # type: ignore[arg-type]


def numpy_mean(sites: list[FakeSite], name: str = "body.weight") -> np.ndarray:
    """Round 1 trains from zeros: each site sends 0.5 * target, weighted by its count."""
    return np.average([0.5 * s.target[name].astype(np.float64) for s in sites], axis=0,
                      weights=[s.num_examples for s in sites])


def test_streamed_round_holds_one_reply_and_decrypts_to_the_batch_sum(
        key_dir: Path, site_key: SiteKey) -> None:
    sites = sites_of(site_key, 6)
    streamed, grid = strategy(key_dir, 6), CountingGrid(sites)
    streamed.start(grid, ArrayRecord(), num_rounds=1)
    assert max(grid.peaks) == 1  # each update was folded and gone before the next was pulled

    batch, batch_grid = strategy(key_dir, 6), CountingGrid(sites_of(site_key, 6))
    messages = batch.configure_train(1, ArrayRecord(), ConfigRecord(), batch_grid)
    batch.aggregate_train(1, batch_grid.send_and_receive(messages))  # Flower's: all at once
    assert max(batch_grid.peaks) == 6  # what the count above would show without streaming

    layout = TensorLayout.of(sites[0].target)
    got, expected = decrypted_global(streamed, site_key, layout), decrypted_global(
        batch, site_key, layout)
    for name in got:  # the exact grid sum: equal bit for bit, however it was folded
        np.testing.assert_array_equal(got[name], expected[name])
    assert np.max(np.abs(got["body.weight"] - numpy_mean(sites))) <= grid_error(6)


def break_second_ciphertext(content: RecordDict) -> None:
    blobs = wire.record_to_ciphertexts(content[wire.UPDATE])  # type: ignore[arg-type]
    content[wire.UPDATE] = wire.ciphertexts_to_record([blobs[0], blobs[1][:-700], *blobs[2:]])


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_reply_mid_stream_is_excluded_and_the_others_are_folded(
        key_dir: Path, site_key: SiteKey, workers: int) -> None:
    """The third reply of five fails in its second ciphertext, after its first was added:
    taken back, so the sum is the four others' exactly (serial, and over two workers)."""
    sites = sites_of(site_key, 5)
    sites[2].tamper = only("train", edit=break_second_ciphertext)
    aggregator = strategy(key_dir, 5, workers=workers)
    aggregator.start(FakeGrid(sites), ArrayRecord(), num_rounds=1)
    [rejection] = aggregator.history.rejections
    assert (rejection.site, rejection.kind) == ("h2", "train")
    assert rejection.reason.startswith("ciphertext 1 does not deserialize")
    good = [s for s in sites if s.name != "h2"]
    assert set(aggregator.history.sites("train", 1)) == {s.name for s in good}
    assert aggregator.current is not None
    got = decrypted_global(aggregator, site_key, TensorLayout.of(sites[0].target))
    assert np.max(np.abs(got["body.weight"] - numpy_mean(good))) <= grid_error(
        4, aggregator.current.weight_sum)


def test_round_one_majority_layout_wins_even_when_a_stranger_answers_first(
        key_dir: Path, site_key: SiteKey) -> None:
    """The first reply leads with a layout of its own and is folded; the honest layout takes
    the lead at its second reply, and the stranger's sum is dropped at the close."""
    odd = FakeSite("odd", site_key, 500, random_tensors(9, width=20_000))
    honest = [FakeSite(f"h{k}", site_key, 10, random_tensors(k, width=WIDTH)) for k in range(3)]
    aggregator = strategy(key_dir, 4)
    grid = FakeGrid([odd, *honest])  # node 101 (odd) answers first
    messages = aggregator.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    aggregator.aggregate_train(1, StreamingGrid(grid).send_and_receive(messages))
    assert {r.site for r in aggregator.history.rejections} == {"odd"}
    assert set(aggregator.history.sites("train", 1)) == {"h0", "h1", "h2"}
    got = decrypted_global(aggregator, site_key, TensorLayout.of(honest[0].target))
    assert aggregator.current is not None
    assert np.max(np.abs(got["body.weight"] - numpy_mean(honest))) <= grid_error(
        3, aggregator.current.weight_sum)


class SilentGrid(FakeGrid):
    """Node 103 never answers: its reply is never there to pull."""

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return super().pull_messages(
            [i for i in message_ids if self.pushed[i].metadata.dst_node_id != 103])


def test_stream_stops_at_the_timeout_and_the_round_closes_with_the_replies_in(
        key_dir: Path, site_key: SiteKey) -> None:
    sites = [FakeSite(f"h{k}", site_key, 10, random_tensors(k)) for k in range(3)]
    aggregator = strategy(key_dir, 3, uniform_weights=True)
    grid = SilentGrid(sites)
    started = time.monotonic()
    messages = aggregator.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    replies = StreamingGrid(grid, poll_seconds=0.05).send_and_receive(messages, timeout=0.5)
    arrays, _ = aggregator.aggregate_train(1, replies)
    assert 0.5 <= time.monotonic() - started < 5
    assert arrays is not None and set(aggregator.history.sites("train", 1)) == {"h0", "h1"}


def test_parallel_sum_is_the_serial_sum_bit_for_bit(key_dir: Path, site_key: SiteKey) -> None:
    aggregator = load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE)
    rng = np.random.default_rng(4)
    records = [encrypt_update(site_key, {"w": rng.normal(size=7 * 4096 + 5)}, 0.2)
               for _ in range(5)]
    serial = RunningSum(aggregator, None)
    with SumWorkers(aggregator, 2) as workers:
        parallel = workers.new_sum(None)
        for record in records:
            serial.fold(record)
            parallel.fold(record)
        broken = wire.record_to_ciphertexts(records[0])
        bad = wire.ciphertexts_to_record([*broken[:6], broken[6][:-900], *broken[7:]])
        for running in (serial, parallel):  # the second worker's range fails: the first undoes
            with pytest.raises(ReplyRejected, match="ciphertext 6 does not deserialize"):
                running.fold(bad)
        assert parallel.chunk_sizes == serial.chunk_sizes
        assert parallel.ciphertexts() == serial.ciphertexts()


def test_a_quantized_sum_never_holds_more_updates_than_its_preset_allows(
        tmp_path: Path) -> None:
    """`packed` digits carry into each other beyond `max_sites` updates: the 33rd is refused."""
    init_key_files(tmp_path, "packed")
    key = load_site_context(tmp_path / wire.SITE_KEY_FILE)
    limit = key.preset.quantization.max_sites  # type: ignore[union-attr]
    sites = [FakeSite(f"h{k}", key, 10, random_tensors(k, width=300)) for k in range(limit + 1)]
    aggregator = strategy(tmp_path, limit + 1, uniform_weights=True)
    grid = FakeGrid(sites)
    messages = aggregator.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert aggregator.aggregate_train(1, StreamingGrid(grid).send_and_receive(messages))[0]
    [rejection] = aggregator.history.rejections
    assert rejection.site == f"h{limit}" and rejection.reason.startswith(
        f"{limit} updates are in this round's sum already")
    assert len(aggregator.history.sites("train", 1)) == limit
    assert aggregator.current is not None
    got = decrypted_global(aggregator, key, TensorLayout.of(sites[0].target))  # sites' check
    assert np.isfinite(got["body.weight"]).all()

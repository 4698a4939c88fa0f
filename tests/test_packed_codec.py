"""The quantized, packed preset and the parallel codec, with real TenSEAL ciphertexts.

The sums go through the aggregator's own `sum_updates`; sizes are small but span several
ciphertexts, and the parallel tests span enough of them to use the worker processes.
"""

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedhealth.core.crypto import packed_digits, wire
from fedhealth.core.crypto.chunk_pool import (
    MIN_PARALLEL_CIPHERTEXTS,
    shared_file,
    worker_pids,
)
from fedhealth.core.crypto.chunk_ranges import split
from fedhealth.core.crypto.codec import (
    IntegrityError,
    Packing,
    RoundBinding,
    decrypt_global,
    decrypt_vector,
    encrypt_update,
    encrypt_vector,
)
from fedhealth.core.crypto.keys import (
    AggregatorKey,
    SiteKey,
    init_key_files,
    load_aggregator_context,
    load_site_context,
)
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import build_reply, read_instruction
from fedhealth.core.crypto.presets import CkksPreset, HeadroomError, Quantization
from strategies.ciphertext_sum import sum_updates


def keys(out: Path, preset: str) -> tuple[SiteKey, AggregatorKey]:
    init_key_files(out, preset)
    return (load_site_context(out / wire.SITE_KEY_FILE),
            load_aggregator_context(out / wire.AGGREGATOR_KEY_FILE))


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteKey, AggregatorKey]:
    return keys(tmp_path_factory.mktemp("packed"), "packed")


def global_of(key: SiteKey, aggregator: AggregatorKey, updates: list[dict[str, np.ndarray]],
              weights: list[float], **kwargs: int) -> dict[str, np.ndarray]:
    """The sites' updates encrypted, summed by the aggregator's code, decrypted by a site."""
    total = sum_updates(aggregator, [encrypt_update(key, u, a, **kwargs)
                                     for u, a in zip(updates, weights, strict=True)])
    assert total is not None
    return decrypt_global(key, wire.ciphertexts_to_record(total.ciphertexts),
                          TensorLayout.of(updates[0]), float(np.sum(weights)), **kwargs)


def test_the_packed_preset_costs_less_than_plaintext_float32(
        packed: tuple[SiteKey, AggregatorKey]) -> None:
    site, _ = packed
    params = 3 * Packing.of(1, site.preset).params_per_ciphertext
    record = encrypt_update(site, {"w": np.zeros(params, dtype=np.float32)}, 0.5)
    assert site.preset.digits_per_real == 3
    assert sum(len(a.data) for a in record.values()) / params <= 4.0


EXTREMES = {
    "all at +max": lambda n, largest: np.full(n, largest),
    "all at -max": lambda n, largest: np.full(n, -largest),
    "alternating": lambda n, largest: np.where(np.arange(n) % 2, largest, -largest),
}


@pytest.mark.parametrize("pattern", sorted(EXTREMES))
@pytest.mark.parametrize("weighting", ["uniform", "skewed"])
def test_weighted_mean_within_its_bound_at_the_headroom_limit(
        packed: tuple[SiteKey, AggregatorKey], pattern: str, weighting: str) -> None:
    """max_sites updates at the quantizer's extremes (per site, alternating in sign between
    sites too): the decrypted mean is numpy's within `Quantization.mean_error`."""
    site, aggregator = packed
    quantization = site.preset.quantization
    assert quantization is not None
    sites, params = quantization.max_sites, 13_000  # two ciphertexts
    values = EXTREMES[pattern](params, quantization.largest)
    updates = [{"w": (values if k % 2 == 0 or pattern != "alternating" else -values
                      ).astype(np.float32)} for k in range(sites)]
    counts = np.ones(sites) if weighting == "uniform" else np.arange(1, sites + 1) ** 2
    weights = [float(c / counts.sum()) for c in counts]
    got = global_of(site, aggregator, updates, weights)["w"]
    exact = np.average([u["w"].astype(np.float64) for u in updates], axis=0, weights=weights)
    error = np.max(np.abs(got - exact))
    assert error <= quantization.mean_error(sites, float(np.sum(weights)))
    assert np.max(np.abs(got)) <= quantization.largest + quantization.mean_error(sites, 1.0)


def test_packed_digits_never_carry_at_the_largest_digit_sum(
        packed: tuple[SiteKey, AggregatorKey]) -> None:
    """Digit sums of exactly +-largest_digit (what max_sites sites can produce at s = 1), summed
    under CKKS, come back digit by digit; one beyond the digit's half range would not."""
    site, aggregator = packed
    quantization = site.preset.quantization
    assert quantization is not None
    bits, per, sites = quantization.digit_bits, site.preset.digits_per_real, quantization.max_sites
    size = 2 * per * 1000
    target = quantization.largest_digit * np.where(np.arange(size) % 3 == 1, -1, 1)
    shares = np.diff(np.linspace(0, 1, sites + 1)[:, None] * target, axis=0).round().astype(int)
    shares[-1] += target - shares.sum(axis=0)  # sites' counts that sum to exactly `target`
    blobs = [encrypt_vector(site, packed_digits.pack(s, bits, per)) for s in shares]
    total = sum_updates(aggregator, [wire.ciphertexts_to_record(b) for b in blobs])
    assert total is not None
    reals = decrypt_vector(site, total.ciphertexts, size // per)
    digits, carried = packed_digits.unpack(np.rint(reals), bits, per, size)
    assert carried == 0 and np.array_equal(digits, target)

    beyond = np.full(per, 2 ** (bits - 1))  # one past the largest a digit can hold
    wrapped, _ = packed_digits.unpack(packed_digits.pack(beyond, bits, per), bits, per, per)
    assert not np.array_equal(wrapped, beyond)


def test_more_sites_than_the_digits_hold_are_refused(
        packed: tuple[SiteKey, AggregatorKey]) -> None:
    site, aggregator = packed
    quantization = site.preset.quantization
    assert quantization is not None
    sites = quantization.max_sites + 1
    update = {"w": np.full(10, 0.5, dtype=np.float32)}
    total = sum_updates(aggregator, [encrypt_update(site, update, 1 / sites)] * sites)
    assert total is not None
    with pytest.raises(IntegrityError, match="summed too many sites"):
        decrypt_global(site, wire.ciphertexts_to_record(total.ciphertexts),
                       TensorLayout.of(update), 1.0)


def test_a_value_beyond_the_quantizers_range_is_refused_not_wrapped(
        packed: tuple[SiteKey, AggregatorKey]) -> None:
    site, _ = packed
    quantization = site.preset.quantization
    assert quantization is not None
    largest = quantization.largest
    ok = {"conv.weight": np.full(4, largest, dtype=np.float32), "bn.running_var": np.ones(3)}
    encrypt_update(site, ok, 0.5)  # the limit itself is in range
    for bad in (np.nextafter(largest, np.inf), -2 * largest, np.nan, np.inf):
        with pytest.raises(HeadroomError, match="tensor 'bn.running_var' holds"):
            encrypt_update(site, {**ok, "bn.running_var": np.array([1.0, bad, 1.0])}, 0.5)
    with pytest.raises(HeadroomError, match="weights summing to at most 1"):
        encrypt_update(site, ok, 0.5, weight_sum_bound=2.0)


def test_ranges_follow_the_received_global(packed: tuple[SiteKey, AggregatorKey]) -> None:
    """A ciphertext of running variances near 5 and one of weights near 0.1 each get 2^12 steps
    over their own range, derived from the global the sites received; beyond it is refused."""
    site, aggregator = packed
    quantization = site.preset.quantization
    assert quantization is not None
    per = Packing.of(1, site.preset).params_per_ciphertext
    rng = np.random.default_rng(3)
    received = {"bn.running_var": rng.uniform(4.0, 5.0, per).astype(np.float32),
                "conv.weight": rng.uniform(-0.1, 0.1, per).astype(np.float32)}
    ranges = [quantization.range_bits(5.0), quantization.range_bits(0.1)]
    assert ranges == [5, 0]  # 4x room above the received global, at least 2^floor_bits
    updates = [{"bn.running_var": received["bn.running_var"] * f,
                "conv.weight": received["conv.weight"] * f} for f in (3.0, 5.0)]
    weights = [0.5, 0.5]
    total = sum_updates(aggregator, [encrypt_update(site, u, a, received=received)
                                     for u, a in zip(updates, weights, strict=True)])
    assert total is not None
    got = decrypt_global(site, wire.ciphertexts_to_record(total.ciphertexts),
                         TensorLayout.of(received), 1.0)
    for name, r in zip(received, ranges, strict=True):
        exact = np.mean([u[name].astype(np.float64) for u in updates], axis=0)
        assert np.max(np.abs(got[name] - exact)) <= quantization.mean_error(2, 1.0, r), name
    assert quantization.mean_error(2, 1.0, ranges[1]) < quantization.mean_error(2, 1.0) / 3

    with pytest.raises(HeadroomError, match="tensor 'conv.weight' holds"):
        encrypt_update(site, {**updates[0], "conv.weight": received["conv.weight"] * 11},
                       0.5, received=received)


def test_sites_that_received_different_globals_are_refused(
        packed: tuple[SiteKey, AggregatorKey]) -> None:
    site, aggregator = packed
    update = {"w": np.full(100, 0.05, dtype=np.float32)}
    total = sum_updates(aggregator, [encrypt_update(site, update, 0.5, received=update),
                                     encrypt_update(site, update, 0.5, received=None)])
    assert total is not None
    with pytest.raises(IntegrityError, match="different ranges"):
        decrypt_global(site, wire.ciphertexts_to_record(total.ciphertexts),
                       TensorLayout.of(update), 1.0)


def test_a_preset_whose_digits_do_not_fit_is_refused() -> None:
    with pytest.raises(HeadroomError, match="does not fit"):
        CkksPreset("too-fine", 4096, (60, 49), 17, quantization=Quantization(
            level_bits=50, first_bits=2, floor_bits=0, margin_bits=2, max_sites=32))


def test_a_damaged_packed_ciphertext_is_refused(packed: tuple[SiteKey, AggregatorKey]) -> None:
    site, _ = packed
    update = {"w": np.linspace(-1, 1, 5000, dtype=np.float32)}
    blobs = wire.record_to_ciphertexts(encrypt_update(site, update, 1.0))
    damaged = bytearray(blobs[0])
    damaged[len(damaged) // 2] ^= 0x10
    with pytest.raises(IntegrityError):
        decrypt_global(site, wire.ciphertexts_to_record([bytes(damaged)]),
                       TensorLayout.of(update), 1.0)


@pytest.mark.parametrize("preset", ["default", "packed"])
def test_parallel_codec_decrypts_to_the_serial_codecs_bytes(tmp_path: Path, preset: str) -> None:
    """Two processes against one, for encryption and decryption: the same decrypted bytes."""
    site, aggregator = keys(tmp_path, preset)
    params = MIN_PARALLEL_CIPHERTEXTS * Packing.of(1, site.preset).params_per_ciphertext + 17
    rng = np.random.default_rng(7)
    updates = [{"w": rng.uniform(-1, 1, params).astype(np.float32),
                "b": rng.uniform(-1, 1, 5).astype(np.float32)} for _ in range(2)]
    weights = [0.25, 0.75]
    serial = global_of(site, aggregator, updates, weights, workers=1)
    parallel = global_of(site, aggregator, updates, weights, workers=2)
    for name in serial:
        assert serial[name].tobytes() == parallel[name].tobytes(), name

    record = encrypt_update(site, updates[0], 1.0, workers=2)  # one set of ciphertexts, two ways
    layout = TensorLayout.of(updates[0])
    one = decrypt_global(site, record, layout, 1.0, workers=1)
    two = decrypt_global(site, record, layout, 1.0, workers=2)
    assert all(one[n].tobytes() == two[n].tobytes() for n in one)


def test_two_rounds_through_the_site_messages(packed: tuple[SiteKey, AggregatorKey]) -> None:
    """Round 1 from the seed (no global: the first range), round 2 from the decrypted global
    (ranges from it), as `build_reply` and `Instruction.global_tensors` carry them."""
    site, aggregator = packed
    rng = np.random.default_rng(11)
    start = {"conv.weight": rng.uniform(-0.1, 0.1, 3000).astype(np.float32),
             "bn.running_var": rng.uniform(0.5, 1.5, 16).astype(np.float32)}
    layout = TensorLayout.of(start)
    weights = [0.2, 0.3, 0.5]

    def crypto(server_round: int, global_round: int) -> ConfigRecord:
        return ConfigRecord({wire.SERVER_ROUND: server_round, wire.WEIGHT_SUM: 1.0,
                             wire.SITE_WEIGHT: 0.0, wire.LAYOUT_HASH: layout.hash,
                             wire.FINGERPRINT: site.fingerprint, wire.TRAINING_ID: "t",
                             wire.NONCE: "n", wire.GLOBAL_ROUND: global_round})

    def round_of(server_round: int, record: ArrayRecord | None,
                 trained: Callable[[dict[str, np.ndarray] | None, int], dict[str, np.ndarray]]
                 ) -> tuple[ArrayRecord, list[dict[str, np.ndarray]]]:
        replies, sent = [], []
        for k, a in enumerate(weights):
            content = RecordDict({wire.CRYPTO: crypto(server_round, server_round - 1)})
            content.config_records[wire.CRYPTO][wire.SITE_WEIGHT] = a
            if record is not None:
                content[wire.GLOBAL] = record
            instruction = read_instruction(content)
            received = instruction.global_tensors(site, layout)
            sent.append(trained(received, k))
            replies.append(build_reply(site, instruction, sent[-1], 10, {}, f"h{k}",
                                       received=received).array_records[wire.UPDATE])
        total = sum_updates(aggregator, replies)
        assert total is not None
        return wire.ciphertexts_to_record(total.ciphertexts), sent

    first, sent = round_of(1, None, lambda g, k: {n: t + 0.01 * k for n, t in start.items()})
    second, sent = round_of(2, first, lambda g, k: {n: (t * 4.0 if "var" in n else t) + 0.001 * k
                                                    for n, t in (g or {}).items()})
    got = decrypt_global(site, second, layout, 1.0, binding=RoundBinding("t", 2))
    quantization = site.preset.quantization
    assert quantization is not None
    for name in layout.unflatten(np.zeros(layout.size)):
        exact = np.average([s[name].astype(np.float64) for s in sent], axis=0, weights=weights)
        r = quantization.range_bits(float(np.max(np.abs(sent[0][name] / (4.0 if "var" in name
                                                                          else 1.0)))))
        assert np.max(np.abs(got[name] - exact)) <= quantization.mean_error(3, 1.0, r), name


def test_a_killed_worker_costs_time_not_the_update(tmp_path: Path) -> None:
    site, _ = keys(tmp_path, "packed")
    params = MIN_PARALLEL_CIPHERTEXTS * Packing.of(1, site.preset).params_per_ciphertext
    update = {"w": np.random.default_rng(5).uniform(-1, 1, params).astype(np.float32)}
    layout = TensorLayout.of(update)
    expected = decrypt_global(site, encrypt_update(site, update, 1.0, workers=2), layout, 1.0)
    killed = worker_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    record = encrypt_update(site, update, 1.0, workers=2)  # its pool died under it
    assert decrypt_global(site, record, layout, 1.0, workers=2)["w"].tobytes() == \
        expected["w"].tobytes()
    assert killed and not set(killed) & set(worker_pids())  # a new pool took over


def test_the_callers_range_is_shorter_by_its_own_serial_work() -> None:
    ranges = split(1711, 2, 0.07)
    assert [len(r) for r in ranges] == [796, 915]  # 0.93 : 1.07
    assert ranges[0].start == 0 and ranges[0].stop == ranges[1].start and ranges[1].stop == 1711
    assert split(1711, 2) == [range(0, 856), range(856, 1711)]
    assert [len(r) for r in split(3, 3, 0.07)] == [1, 1, 1]  # never an empty range


def test_parallel_calls_from_two_threads_each_get_their_own_bytes(tmp_path: Path) -> None:
    """The process keeps one shared file for its calls; a call made while another thread holds
    it must not write into it (each thread decrypts its own global, both checked)."""
    site, _ = keys(tmp_path, "default")
    params = MIN_PARALLEL_CIPHERTEXTS * Packing.of(1, site.preset).params_per_ciphertext
    rng = np.random.default_rng(3)
    updates = [{"w": rng.uniform(-1, 1, params).astype(np.float32)} for _ in range(2)]
    layout = TensorLayout.of(updates[0])
    records = [encrypt_update(site, u, 1.0, workers=2) for u in updates]
    serial = [decrypt_global(site, r, layout, 1.0, workers=1)["w"].tobytes() for r in records]
    with ThreadPoolExecutor(2) as threads:
        for _ in range(3):
            got = list(threads.map(lambda r: decrypt_global(site, r, layout, 1.0, workers=2)["w"],
                                   records))
            assert [g.tobytes() for g in got] == serial
    with shared_file(10) as first:
        pass
    with shared_file(5) as again:
        assert again is first  # kept, not made anew: its pages are already allocated

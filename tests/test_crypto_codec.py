"""Codec and site messages with real TenSEAL ciphertexts at small sizes."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, RecordDict

from fedhealth.core import fixed_point
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import (
    UNBOUND,
    IntegrityError,
    Packing,
    RoundBinding,
    check_gain,
    check_values,
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
from fedhealth.core.crypto.messages import InstructionError, build_reply, read_instruction
from fedhealth.core.crypto.presets import PRESETS, HeadroomError
from strategies.ciphertext_sum import sum_updates


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "fc.bias": rng.normal(size=(5000,)),  # spans two ciphertexts of 4096 values
            "bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def test_layout_roundtrip_and_hash() -> None:
    t = tensors()
    layout = TensorLayout.of(t)
    assert layout.size == 216 + 5000 + 1
    back = layout.unflatten(layout.flatten(t))
    for name, value in t.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
    reordered = dict(reversed(list(t.items())))
    assert TensorLayout.of(reordered).hash != layout.hash
    with pytest.raises(ValueError, match="do not match the layout"):
        layout.flatten(reordered)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def key_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[SiteKey, AggregatorKey]:
    out = tmp_path_factory.mktemp(request.param)
    init_key_files(out, request.param)
    return load_site_context(out / "site.ctx"), load_aggregator_context(out / "aggregator.ctx")


def test_chunks_pack_and_sum_per_preset(key_pair: tuple[SiteKey, AggregatorKey]) -> None:
    """Chunking, complex/seeded packing and its size, and an aggregator-side sum, per preset."""
    site, aggregator = key_pair
    preset = site.preset
    per = preset.values_per_ciphertext
    rng = np.random.default_rng(1)
    vectors = [rng.normal(size=2 * per + 1) for _ in range(2)]  # odd: a half-used last slot
    blobs = [encrypt_vector(site, v) for v in vectors]
    assert len(blobs[0]) == 3
    bytes_per_value = len(blobs[0][0]) / per
    assert bytes_per_value <= {"default": 16.1, "compact": 8.1, "nvflare": 64.1,
                               "packed": 8.1}[preset.name]
    noise = 1e-7 * check_gain(preset)  # CKKS noise is absolute at the scale: 2^-40 * 2^(40 - bits)
    assert np.max(np.abs(decrypt_vector(site, blobs[0], len(vectors[0])) - vectors[0])) < noise

    total = sum_updates(aggregator, [wire.ciphertexts_to_record(b) for b in blobs])
    assert total is not None and total.chunk_sizes == (preset.slots, preset.slots, 1)
    summed = decrypt_vector(site, total.ciphertexts, len(vectors[0]))
    assert np.max(np.abs(summed - vectors[0] - vectors[1])) < noise


def test_record_carries_ciphertext_bytes_exactly() -> None:
    blobs = [bytes(range(7)), b"\x00" * 3]
    record = wire.ciphertexts_to_record(blobs)
    assert wire.record_to_ciphertexts(record) == blobs
    record["ct-00001"] = Array(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="ct-00001 must be a non-empty .fedhealth.ckks. uint8"):
        wire.record_to_ciphertexts(record)
    record["ct-00003"] = record.pop("ct-00001")
    with pytest.raises(ValueError, match="without gaps"):
        wire.record_to_ciphertexts(record)


def test_update_is_weighted_and_decrypts_to_tensors(site_key: SiteKey) -> None:
    t = tensors()
    record = encrypt_update(site_key, t, 0.25)
    assert all(array.dtype == "uint8" for array in record.values())
    out = decrypt_global(site_key, record, TensorLayout.of(t), 0.25)
    # the grid moves a value by at most STEP / 2 / a_k, and CKKS noise is rounded away
    assert np.max(np.abs(out["fc.bias"] - t["fc.bias"])) <= fixed_point.STEP / 2 / 0.25
    assert out["bn.num_batches_tracked"] == 7


def _grid_sum(updates: list[dict[str, np.ndarray]], weights: list[float]) -> np.ndarray:
    """The exact sum of the sites' grid terms, as integers (independent of float64 addition)."""
    layout = TensorLayout.of(updates[0])
    steps = sum(np.rint(fixed_point.on_grid(layout.flatten(u), a) / fixed_point.STEP
                        ).astype(np.int64) for u, a in zip(updates, weights, strict=True))
    return np.asarray(steps, dtype=np.float64) * fixed_point.STEP


@pytest.mark.parametrize("sites", [2, 10, 100])
def test_decrypted_sum_of_k_updates_is_the_exact_grid_sum(
        site_key: SiteKey, key_dir: Path, sites: int) -> None:
    """Bit for bit what a plaintext run computes from the same updates and weights."""
    aggregator = load_aggregator_context(key_dir / "aggregator.ctx")
    rng = np.random.default_rng(sites)
    updates = [{"w": rng.normal(size=3000).astype(np.float32),
                "bias": rng.normal(size=(7,)).astype(np.float32)} for _ in range(sites)]
    counts = rng.integers(10, 500, size=sites)
    weights = [float(c / counts.sum()) for c in counts]
    binding = RoundBinding("t", 3)
    total = sum_updates(aggregator, [encrypt_update(site_key, u, a, binding=binding)
                                     for u, a in zip(updates, weights, strict=True)])
    assert total is not None
    s = fixed_point.weight_sum(weights)
    layout = TensorLayout.of(updates[0])
    packing = Packing.of(layout.size, site_key.preset)
    decrypted, _ = packing.split(decrypt_vector(site_key, total.ciphertexts, packing.payload_size))
    exact = _grid_sum(updates, weights)
    assert np.array_equal(fixed_point.snap(decrypted), exact)
    assert not np.array_equal(decrypted, exact)  # there was CKKS noise to remove
    got = decrypt_global(site_key, wire.ciphertexts_to_record(total.ciphertexts), layout, s,
                         binding=binding)
    plain = layout.unflatten(fixed_point.mean(fixed_point.sum_on_grid(
        fixed_point.on_grid(layout.flatten(u), a) for u, a in zip(updates, weights, strict=True)),
        s))
    for name in layout.unflatten(exact):
        assert got[name].tobytes() == plain[name].tobytes(), name


def test_update_that_skipped_the_grid_is_refused(site_key: SiteKey) -> None:
    """Correct check values beside data not rounded to the grid: the second signal fires."""
    t = tensors()
    layout = TensorLayout.of(t)
    packing = Packing.of(layout.size, site_key.preset)
    weight = 0.3
    payload = packing.join(layout.flatten(t) * weight,
                           check_values(UNBOUND, packing.ciphertexts) * weight)
    record = wire.ciphertexts_to_record(encrypt_vector(site_key, payload))
    with pytest.raises(IntegrityError, match="not a sum of grid-rounded updates"):
        decrypt_global(site_key, record, layout, weight)


def test_headroom_refuses_values_that_could_overflow(site_key: SiteKey) -> None:
    with pytest.raises(HeadroomError, match="overflow"):
        encrypt_update(site_key, {"w": np.array([1e7])}, 0.5)


def _crypto(site_key: SiteKey, **fields: object) -> ConfigRecord:
    record = {wire.SERVER_ROUND: 1, wire.WEIGHT_SUM: 0.0, wire.SITE_WEIGHT: 0.5,
              wire.LAYOUT_HASH: "", wire.FINGERPRINT: site_key.fingerprint,
              wire.TRAINING_ID: "t1", wire.NONCE: "n1", wire.GLOBAL_ROUND: 0}
    return ConfigRecord({**record, **fields})


def test_reply_and_instruction_records(site_key: SiteKey) -> None:
    t = tensors()
    layout = TensorLayout.of(t)
    round_one = read_instruction(RecordDict({wire.CRYPTO: _crypto(site_key)}))
    reply = build_reply(site_key, round_one, t, 12, {"loss": 0.3}, "hospital-a")
    crypto = reply.config_records[wire.CRYPTO]
    assert crypto[wire.LAYOUT_HASH] == layout.hash
    assert crypto[wire.FINGERPRINT] == site_key.fingerprint
    assert reply.metric_records[wire.METRICS][wire.NUM_EXAMPLES] == 12

    content = RecordDict({
        wire.GLOBAL: reply.array_records[wire.UPDATE],
        wire.CRYPTO: _crypto(site_key, **{wire.SERVER_ROUND: 2, wire.WEIGHT_SUM: 0.5,
                                          wire.SITE_WEIGHT: 0.2, wire.LAYOUT_HASH: layout.hash,
                                          wire.GLOBAL_ROUND: 1}),
        wire.CONFIG: ConfigRecord({"local-epochs": 1}),
    })
    instruction = read_instruction(content)
    assert instruction.server_round == 2 and instruction.site_weight == 0.2
    assert np.allclose(instruction.global_tensors(site_key, layout)["fc.bias"], t["fc.bias"],
                       rtol=0, atol=fixed_point.STEP / 2 / 0.5)  # the grid, and no CKKS noise

    content.config_records[wire.CRYPTO][wire.FINGERPRINT] = "another federation"
    with pytest.raises(InstructionError, match="install the site.ctx"):
        read_instruction(content).check(site_key, layout)
    del content.config_records[wire.CRYPTO][wire.WEIGHT_SUM]
    with pytest.raises(InstructionError, match="weight-sum"):
        read_instruction(content)


def test_first_round_has_no_global(site_key: SiteKey) -> None:
    content = RecordDict({wire.CRYPTO: _crypto(site_key)})
    assert read_instruction(content).global_tensors(site_key, TensorLayout.of(tensors())) is None

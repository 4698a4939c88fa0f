"""Codec and site messages with real TenSEAL ciphertexts at small sizes."""


import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, RecordDict

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import decrypt_global, decrypt_vector, encrypt_update, encrypt_vector
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
    assert bytes_per_value <= {"default": 16.1, "compact": 8.1, "nvflare": 64.1}[preset.name]
    assert np.max(np.abs(decrypt_vector(site, blobs[0], len(vectors[0])) - vectors[0])) < 1e-7

    total = sum_updates(aggregator, [wire.ciphertexts_to_record(b) for b in blobs])
    assert total is not None and total.chunk_sizes == (preset.slots, preset.slots, 1)
    summed = decrypt_vector(site, total.ciphertexts, len(vectors[0]))
    assert np.max(np.abs(summed - vectors[0] - vectors[1])) < 1e-7


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
    assert np.max(np.abs(out["fc.bias"] - t["fc.bias"])) < 1e-6
    assert out["bn.num_batches_tracked"] == 7


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
    assert np.allclose(instruction.global_tensors(site_key, layout)["fc.bias"], t["fc.bias"])

    content.config_records[wire.CRYPTO][wire.FINGERPRINT] = "another federation"
    with pytest.raises(InstructionError, match="install the site.ctx"):
        read_instruction(content).check(site_key, layout)
    del content.config_records[wire.CRYPTO][wire.WEIGHT_SUM]
    with pytest.raises(InstructionError, match="weight-sum"):
        read_instruction(content)


def test_first_round_has_no_global(site_key: SiteKey) -> None:
    content = RecordDict({wire.CRYPTO: _crypto(site_key)})
    assert read_instruction(content).global_tensors(site_key, TensorLayout.of(tensors())) is None

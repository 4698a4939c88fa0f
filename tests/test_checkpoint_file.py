"""The checkpoint file: streamed to disk in np.savez's format, checksummed, atomic, no copies.

Real ciphertexts (`encrypt_update` at the default preset); the other damage cases live in
tests/test_integrity.py.
"""

import io
import json
import time
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from strategy_harness import random_tensors

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import encrypt_update
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.file_checksum import ChecksumWriter, with_checksum
from strategies.checkpoint import EncryptedGlobal, load_checkpoint, save_checkpoint


def _state(key: SiteKey, width: int, server_round: int = 3) -> EncryptedGlobal:
    blobs = wire.record_to_ciphertexts(encrypt_update(key, random_tensors(0, width), 1.0,
                                                      workers=1))
    return EncryptedGlobal(server_round, blobs, 1.0, "a" * 64, (4096,) * len(blobs),
                           key.fingerprint, "train-1")


def test_checkpoint_is_byte_for_byte_what_savez_and_with_checksum_made(
        tmp_path: Path, site_key: SiteKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The on-disk format is unchanged: old checkpoints load, and old readers read new ones."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # zip entries' timestamps
    state = _state(site_key, 20_000)
    written = save_checkpoint(tmp_path, state).read_bytes()
    meta = {k: v for k, v in asdict(state).items() if k != "ciphertexts"}
    buffer = io.BytesIO()
    np.savez(buffer, **{wire.ciphertext_name(i): np.frombuffer(b, dtype=np.uint8)
                        for i, b in enumerate(state.ciphertexts)},
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    assert written == with_checksum(buffer.getvalue())
    loaded, _ = load_checkpoint(tmp_path)  # type: ignore[misc]
    assert loaded == state and loaded.ciphertexts == state.ciphertexts


def test_saving_holds_no_copy_of_the_global(tmp_path: Path, site_key: SiteKey) -> None:
    """Python allocations while saving stay far below the ciphertexts' size (building the npz
    in memory and checksumming it took three times their size)."""
    state = _state(site_key, 400_000)  # 50 ciphertexts, 3.3 MB
    size = sum(map(len, state.ciphertexts))
    tracemalloc.start()
    try:
        save_checkpoint(tmp_path, state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 10, f"saving allocated {peak} bytes at its peak for {size} bytes"


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, site_key: SiteKey,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, _state(site_key, 5000, server_round=1))
    calls = []

    def fail_on_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        original(*args, **kwargs)

    original = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", fail_on_second)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, _state(site_key, 5000, server_round=2))
    monkeypatch.undo()
    loaded, _ = load_checkpoint(tmp_path)  # type: ignore[misc]
    assert loaded.server_round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [wire.CHECKPOINT_FILE]  # no temp file


def test_checksum_writer_hashes_rewrites_and_refuses_settled_bytes(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w+b") as handle:
        writer = ChecksumWriter(handle)
        writer.write(b"header??")
        writer.write(b"-body-")
        writer.seek(6)
        writer.write(b"OK")  # rewritten before it settled, as zipfile does with a header
        writer.seek(0, 2)
        writer.settle()
        writer.write(b"tail")
        writer.seek(0)
        with pytest.raises(ValueError, match="outside the bytes not yet hashed"):
            writer.write(b"late")
        writer.seek(0, 2)
        writer.finish()
    assert (tmp_path / "f").read_bytes() == with_checksum(b"headerOK-body-tail")


def test_loading_holds_the_global_once(tmp_path: Path, site_key: SiteKey) -> None:
    """The file is hashed in blocks and parsed from disk: Python allocations while loading stay
    near the ciphertexts' own size (reading it whole, cutting its trailer off and parsing the
    copy took three to four times their size)."""
    state = _state(site_key, 400_000)
    size = sum(map(len, state.ciphertexts))
    save_checkpoint(tmp_path, state)
    tracemalloc.start()
    try:
        loaded = load_checkpoint(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded is not None and loaded[0].ciphertexts == state.ciphertexts
    assert peak < 1.3 * size, f"loading allocated {peak} bytes at its peak for {size} bytes"

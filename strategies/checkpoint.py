"""The encrypted global model on disk: ciphertexts, s, round, layout and key fingerprint.

Written atomically (temporary file, fsync, rename) after every round, so a crash leaves either
the previous checkpoint or the new one, never half of one; a sha256 trailer over the whole file
(`fedhealth.core.file_checksum`) catches what happens to it afterwards. The file is an npz
(`np.savez`'s zip of `.npy` entries) streamed into the temporary file one ciphertext at a time
and hashed as it goes: built in memory and then checksummed, it cost three more copies of the
global in the ServerApp at the end of every round (5.5x one update's size at its peak).
Whatever is wrong with a checkpoint (truncated, garbage, a changed bit, a missing ciphertext, s
of 0, a round that is not a number), loading raises one `CheckpointDamaged` naming the file and
what to do, before any round runs from it.
"""

import json
import math
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.core.atomic_file import atomic_writer, write_atomically
from fedhealth.core.crypto.wire import CHECKPOINT_FILE, HISTORY_FILE, ciphertext_name
from fedhealth.core.file_checksum import ChecksumError, ChecksumWriter, FileBody, verified_file

_META = "meta"


class CheckpointDamaged(ValueError):
    """A checkpoint cannot be resumed from; the message names the file and what to do."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"checkpoint {path} is damaged: {problem}. Restore it (and {HISTORY_FILE} beside it) "
            "from a backup and resume again, or move the checkpoint folder away to start a new "
            "run (its rounds are then lost; sites keep their personal layers)")
        self.path = path


@dataclass(frozen=True)
class EncryptedGlobal:
    """E(sum a_k w_k) as serialized ciphertexts, with what a site needs to decrypt it."""

    server_round: int
    ciphertexts: list[bytes] = field(repr=False)
    weight_sum: float
    layout_hash: str
    chunk_sizes: tuple[int, ...]
    key_fingerprint: str
    training_id: str


def save_checkpoint(directory: Path, state: EncryptedGlobal) -> Path:
    """Write `state` to `directory` atomically, with its checksum, holding no copy of it."""
    meta = {k: v for k, v in asdict(state).items() if k != "ciphertexts"}
    arrays: dict[str, Any] = {ciphertext_name(i): np.frombuffer(b, dtype=np.uint8)
                              for i, b in enumerate(state.ciphertexts)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = directory / CHECKPOINT_FILE
    with atomic_writer(path) as handle:
        writer = ChecksumWriter(handle)
        _write_npz(writer, arrays)
        writer.finish()
    return path


def _write_npz(writer: ChecksumWriter, arrays: dict[str, np.ndarray]) -> None:
    """What `np.savez(writer, **arrays)` writes (stored zip64 entries `<name>.npy`, as numpy's
    `_savez` makes them), with the checksum settled after each entry, once zipfile has gone
    back to fill in its header."""
    with zipfile.ZipFile(writer, mode="w", compression=zipfile.ZIP_STORED,  # type: ignore[call-overload]
                         allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)
            writer.settle()


def save_history(directory: Path, history: dict[str, object]) -> Path:
    """The per-site metrics so far, beside the checkpoint (plaintext metrics only)."""
    return write_atomically(directory / HISTORY_FILE, json.dumps(history).encode())


def load_checkpoint(directory: Path) -> tuple[EncryptedGlobal, dict[str, object]] | None:
    """The last checkpoint in `directory` and the metrics history, or None when there is none."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with open(path, "rb") as handle:  # read twice (hashed, then parsed), held once
            meta, blobs = _read_archive(path, verified_file(handle, str(path)))
    except ChecksumError as exc:
        raise CheckpointDamaged(path, exc.problem) from None
    except OSError as exc:
        raise CheckpointDamaged(path, f"it cannot be read ({exc.strerror})") from None
    state = _checked_state(path, meta, blobs)
    return state, _read_history(directory / HISTORY_FILE, path)


def _read_archive(path: Path, body: FileBody) -> tuple[object, list[bytes]]:
    """The metadata and the ciphertexts `ct-00000` .. in order, all present, none empty; each
    one's bytes made as it is read, so the global is in memory once."""
    try:
        with np.load(body, allow_pickle=False) as data:
            names = set(data.files)
            count = len(names) - 1
            expected = {_META, *(ciphertext_name(i) for i in range(count))}
            if names != expected or count < 1:
                missing = sorted(expected - names) or ["ct-00000"]
                raise CheckpointDamaged(path, f"it lacks {', '.join(missing[:3])} (holds "
                                              f"{', '.join(sorted(names)[:4])})")
            meta = json.loads(data[_META].tobytes())
            blobs = [_blob(path, data[ciphertext_name(i)], i) for i in range(count)]
    except CheckpointDamaged:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointDamaged(path, f"it is not a readable archive ({exc})") from None
    return meta, blobs


def _blob(path: Path, array: np.ndarray, index: int) -> bytes:
    if array.dtype != np.uint8 or array.ndim != 1 or array.size == 0:
        raise CheckpointDamaged(path, f"{ciphertext_name(index)} is not a non-empty byte array")
    return array.tobytes()


def _checked_state(path: Path, meta: object, blobs: list[bytes]) -> EncryptedGlobal:
    """Every field present and of its type and range, or CheckpointDamaged naming it."""
    wanted = {f.name for f in fields(EncryptedGlobal)} - {"ciphertexts"}
    if not isinstance(meta, dict) or set(meta) != wanted:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointDamaged(path, f"its metadata holds {keys}, expected {sorted(wanted)}")
    server_round, weight_sum = meta["server_round"], meta["weight_sum"]
    if type(server_round) is not int or server_round < 1:
        raise CheckpointDamaged(path, f"server_round is {server_round!r}, not a round number")
    if (type(weight_sum) not in (int, float) or not math.isfinite(weight_sum)
            or weight_sum <= 0):
        raise CheckpointDamaged(path, f"weight_sum is {weight_sum!r}: s must be finite and > 0")
    sizes = meta["chunk_sizes"]
    if (not isinstance(sizes, list) or len(sizes) != len(blobs)
            or any(type(n) is not int or n < 1 for n in sizes)):
        raise CheckpointDamaged(path, f"chunk_sizes {str(sizes)[:60]} does not describe its "
                                      f"{len(blobs)} ciphertexts")
    for name in ("layout_hash", "key_fingerprint", "training_id"):
        if not isinstance(meta[name], str) or not meta[name]:
            raise CheckpointDamaged(path, f"{name} is {meta[name]!r}, not a non-empty string")
    return EncryptedGlobal(server_round=server_round, ciphertexts=blobs,
                           weight_sum=float(weight_sum), layout_hash=meta["layout_hash"],
                           chunk_sizes=tuple(sizes), key_fingerprint=meta["key_fingerprint"],
                           training_id=meta["training_id"])


def _read_history(history_path: Path, checkpoint: Path) -> dict[str, object]:
    if not history_path.exists():
        return {}
    try:
        history = json.loads(history_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(checkpoint, f"{history_path.name} beside it is not readable "
                                            f"JSON ({exc})") from None
    if not isinstance(history, dict):
        raise CheckpointDamaged(checkpoint, f"{history_path.name} beside it is not a JSON object")
    return history

"""The encrypted global model on disk: ciphertexts, s, round, layout and key fingerprint.

Written atomically (temporary file, fsync, rename) after every round, so a crash leaves
either the previous checkpoint or the new one, never half of one.
"""

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedhealth.core.atomic_file import write_atomically

CHECKPOINT_FILE = "encrypted_global.npz"
HISTORY_FILE = "site_metrics.json"


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
    """Write `state` to `directory` atomically."""
    meta = {k: v for k, v in asdict(state).items() if k != "ciphertexts"}
    arrays = {f"ct-{i:05d}": np.frombuffer(b, dtype=np.uint8)
              for i, b in enumerate(state.ciphertexts)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return write_atomically(directory / CHECKPOINT_FILE, buffer.getbuffer())


def save_history(directory: Path, history: dict[str, object]) -> Path:
    """The per-site metrics so far, beside the checkpoint (plaintext metrics only)."""
    return write_atomically(directory / HISTORY_FILE, json.dumps(history).encode())


def load_checkpoint(directory: Path) -> tuple[EncryptedGlobal, dict[str, object]] | None:
    """The last checkpoint in `directory` and the metrics history, or None when there is none."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            blobs = [data[f"ct-{i:05d}"].tobytes() for i in range(len(data.files) - 1)]
        meta["chunk_sizes"] = tuple(meta["chunk_sizes"])
        state = EncryptedGlobal(ciphertexts=blobs, **meta)
        history_path = directory / HISTORY_FILE
        history = json.loads(history_path.read_text()) if history_path.exists() else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} is damaged ({exc}); move it away to start "
                         "a new run") from None
    return state, history

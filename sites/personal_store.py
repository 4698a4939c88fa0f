"""Where a site keeps tensors between rounds: Context.state and its state directory.

Three kinds are kept: its personal tensors (`PERSONAL`), the last global whose check values
it verified (`ACCEPTED_GLOBAL`), which it falls back to when a later global fails its check, and
the globals it scored, still encrypted, with what it needs to export them (`RECEIVED_GLOBAL`,
filed by sites.round_archive).
`Context.state` lives as long as the SuperNode process; the state directory survives a restart.
Loading prefers the former and falls back to the latter. Each (kind, site, training) has its own
record and file, so two runs or two virtual sites sharing a directory never mix.
"""

import io
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedhealth.core.atomic_file import write_atomically

PERSONAL = "personal"
ACCEPTED_GLOBAL = "accepted-global"
RECEIVED_GLOBAL = "received-global"


class PersonalStoreError(RuntimeError):
    """A stored personal-state file cannot be read."""


class PersonalStore:
    """Persist one kind of a site's tensors for one training.

    state: the ClientApp's `context.state` (or None); state_dir: a folder on the site's disk, or
    None / "" for none; run_key: what identifies the training (the aggregator's training id);
    site: the site's name; kind: `PERSONAL`, `ACCEPTED_GLOBAL` or `RECEIVED_GLOBAL`.
    """

    def __init__(self, state: RecordDict | None, state_dir: str | Path | None, *,
                 run_key: str, site: str, kind: str = PERSONAL) -> None:
        self.state = state
        self.key = f"fedhealth.{kind}.{site}.{run_key}"
        self.path = (store_folder(state_dir, kind, site) / f"run-{path_part(run_key)}.npz"
                     if state_dir else None)

    def load(self) -> dict[str, np.ndarray] | None:
        """The stored tensors, or None when nothing has been stored for this site and run."""
        if self.state is not None and self.key in self.state:
            record = self.state.array_records[self.key]
            return {name: array.numpy() for name, array in record.items()}
        if self.path is None or not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                tensors = {name: saved[name] for name in saved.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise PersonalStoreError(
                f"cannot read stored tensors {self.path}: {err}. Delete the file to restart this "
                "site's personal layers from the global model (or, for an accepted global, to "
                "fall back to the run seed's model)") from err
        if self.state is not None:
            self.state[self.key] = _record(tensors)
        return tensors

    def save(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Store `tensors` in Context.state and, atomically, on disk."""
        if self.state is not None:
            self.state[self.key] = _record(tensors)
        if self.path is None:
            return
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {name: np.asarray(t) for name, t in tensors.items()}
        np.savez(buffer, **arrays)
        write_atomically(self.path, buffer.getbuffer())


def store_folder(state_dir: str | Path, kind: str, site: str) -> Path:
    """The folder holding one kind of one site's files, one `run-<run key>.npz` per training."""
    return Path(state_dir) / kind / path_part(site)


def _record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(t)) for name, t in tensors.items()})


def path_part(part: str) -> str:
    """A path component from a site name or run key."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_"

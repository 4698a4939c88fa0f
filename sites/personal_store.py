"""Where a site keeps tensors between rounds: Context.state and its state directory.

Two kinds are kept: its personal tensors (`PERSONAL`), and the last global whose check values
it verified (`ACCEPTED_GLOBAL`), which it falls back to when a later global fails its check.
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


class PersonalStoreError(RuntimeError):
    """A stored personal-state file cannot be read."""


class PersonalStore:
    """Persist one kind of a site's tensors for one training.

    state: the ClientApp's `context.state` (or None); state_dir: a folder on the site's disk, or
    None / "" for none; run_key: what identifies the training (the aggregator's training id);
    site: the site's name; kind: `PERSONAL` or `ACCEPTED_GLOBAL`.
    """

    def __init__(self, state: RecordDict | None, state_dir: str | Path | None, *,
                 run_key: str, site: str, kind: str = PERSONAL) -> None:
        self.state = state
        self.key = f"fedhealth.{kind}.{site}.{run_key}"
        self.path = (Path(state_dir) / kind / _safe(site) / f"run-{_safe(run_key)}.npz"
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


def _record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(t)) for name, t in tensors.items()})


def _safe(part: str) -> str:
    """A path component from a site name or run key."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_"

"""Write a file so that a reader, or a restart after a crash, sees the old file or the new one.

Checkpoints, personal layers, results and key files are what a long run must never half-lose.
The temporary file is created owner-only (`mkstemp`) and given its final mode before any byte
is written, so a secret is never readable by others, not even for a moment.
"""

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes | memoryview, *, mode: int = 0o600,
                     overwrite: bool = True) -> Path:
    """Temporary file in the same folder, fsync, then rename over `path` (or, with
    `overwrite=False`, hard-link it into place, which fails with FileExistsError if `path`
    exists, so two writers can never replace each other's file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # not filtered by the umask, unlike os.open's mode
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path

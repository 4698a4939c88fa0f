"""Write a file so that a reader, or a restart after a crash, sees the old file or the new one.

Checkpoints, personal layers and results are what a long run must never half-lose.
"""

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes | memoryview) -> Path:
    """Temporary file in the same folder, fsync, rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

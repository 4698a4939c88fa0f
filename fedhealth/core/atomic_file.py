"""Write a file so that a reader, or a restart after a crash, sees the old file or the new one.

Checkpoints, personal layers, results and key files are what a long run must never half-lose.
The temporary file is created owner-only (`mkstemp`) and given its final mode before any byte
is written, so a secret is never readable by others, not even for a moment. `atomic_writer`
hands out the temporary file itself, so a large file (an encrypted global: 113 MB at
DenseNet121 size) is streamed into it instead of being assembled in memory first.
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: Path, *, mode: int = 0o600, overwrite: bool = True) -> Iterator[BinaryIO]:
    """The temporary file in `path`'s folder, open for writing (and seeking); when the block
    ends without an error it is fsynced and renamed over `path` (or, with `overwrite=False`,
    hard-linked into place, which fails with FileExistsError if `path` exists, so two writers
    can never replace each other's file). After an error `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as handle:
            os.fchmod(handle.fileno(), mode)  # not filtered by the umask, unlike os.open's mode
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | memoryview, *, mode: int = 0o600,
                     overwrite: bool = True) -> Path:
    """`data` written to `path` through `atomic_writer`."""
    with atomic_writer(path, mode=mode, overwrite=overwrite) as handle:
        handle.write(data)
    return Path(path)

"""A sha256 trailer over a file's whole content, so one flipped bit anywhere is refused.

Key files and checkpoints are read long after they were written, often after a copy to another
machine; a damaged copy must fail when it is loaded, naming the file, instead of decrypting
wrongly or failing every round later. Formats with their own inner checks (TenSEAL, zip) miss
flips those checks do not cover: 13 of 40 single-bit flips in a key file used to load.
"""

import hashlib
from typing import BinaryIO

_PREFIX = b"\nfedhealth-sha256:"
_TRAILER_SIZE = len(_PREFIX) + 64 + 1  # prefix, hex digest, newline


class ChecksumError(ValueError):
    """The content does not match its checksum: the file is truncated or damaged.

    `problem` says what is wrong without naming the file, for callers that name it themselves.
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.problem = problem


def with_checksum(body: bytes) -> bytes:
    """`body` followed by its sha256 trailer."""
    return body + _trailer(hashlib.sha256(body))


def _trailer(digest: "hashlib._Hash") -> bytes:
    return _PREFIX + digest.hexdigest().encode() + b"\n"


class ChecksumWriter:
    """A file hashed as it is written, then given the trailer `with_checksum` would add.

    For a file too large to build in memory first (a checkpoint). A writer may seek back and
    rewrite what it wrote last (zipfile fills in an entry's sizes and CRC once the entry is
    done), so written bytes are kept in a window until the caller calls `settle()`, which
    hashes and drops them: the window holds what was written since (one zip entry), and a
    write before the settled part raises. `finish()` settles and appends the trailer.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self._settled = handle.tell()
        self._window = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        start = self._handle.tell() - self._settled
        if not 0 <= start <= len(self._window):
            raise ValueError(f"a write at byte {self._settled + start} of {self._handle.name} "
                             f"falls outside the bytes not yet hashed (from "
                             f"{self._settled}): settle() was called too early")
        self._window[start:start + len(data)] = data
        return self._handle.write(data)

    def tell(self) -> int:
        return self._handle.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def flush(self) -> None:
        self._handle.flush()

    def settle(self) -> None:
        """Everything written so far is final: hash it and let it go."""
        self._digest.update(self._window)
        self._settled += len(self._window)
        self._window.clear()

    def finish(self) -> None:
        """Append the checksum trailer over everything written, at the end of the file."""
        self.settle()
        self._handle.seek(self._settled)
        self._handle.write(_trailer(self._digest))


def verified_body(data: bytes, source: str) -> bytes:
    """The body of `data` once its trailer matches; ChecksumError naming `source` otherwise."""
    body = data[:-_TRAILER_SIZE]
    _check(data[-_TRAILER_SIZE:], len(data), hashlib.sha256(body), source)
    return body


def verified_file(handle: BinaryIO, source: str) -> "FileBody":
    """The body of the open file `handle` once its trailer matches, as a read-only file of its
    own; ChecksumError naming `source` otherwise. The body is hashed in 1 MiB blocks, never
    held whole (a checkpoint is the size of the model)."""
    size = handle.seek(0, 2)
    handle.seek(max(0, size - _TRAILER_SIZE))
    trailer = handle.read()
    digest, left = hashlib.sha256(), max(0, size - _TRAILER_SIZE)
    handle.seek(0)
    while left and (block := handle.read(min(left, 1 << 20))):
        digest.update(block)
        left -= len(block)
    _check(trailer, size, digest, source)
    return FileBody(handle, size - _TRAILER_SIZE)


def _check(trailer: bytes, size: int, digest: "hashlib._Hash", source: str) -> None:
    if size < _TRAILER_SIZE or not trailer.startswith(_PREFIX) or not trailer.endswith(b"\n"):
        raise ChecksumError(source, "it has no fedhealth checksum trailer: it is truncated, "
                                    "damaged, or not a file this fedhealth version wrote")
    if trailer[len(_PREFIX):-1] != digest.hexdigest().encode():
        raise ChecksumError(source, "it does not match its sha256 checksum: a byte or bit of "
                                    "it changed")


class FileBody:
    """The first `size` bytes of an open file, read-only: what a reader (zipfile, np.load) sees
    of a checksummed file, its trailer cut off."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._handle = handle
        self._size = size
        self._position = 0

    def read(self, count: int = -1) -> bytes:
        left = self._size - self._position
        count = left if count < 0 else min(count, left)
        self._handle.seek(self._position)
        data = self._handle.read(max(0, count))
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self._size)[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

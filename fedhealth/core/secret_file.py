"""The one rule for secret files (CKKS secret context, site signing keys, TLS and SuperNode keys).

Written atomically, owner-only (0600) from the first byte, and never replacing an existing file
unless the caller asks: a federation's secret key replaced by accident cannot be recovered.
Read only when owner-only: a secret readable by others is refused with the `chmod` that fixes it.
"""

import os
import stat
from pathlib import Path

from fedhealth.core.atomic_file import write_atomically

SECRET_MODE = 0o600


class SecretFileError(ValueError):
    """A secret file is missing, unreadable or readable by group or others."""


def write_secret(path: Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` to `path` atomically with mode 0600; refuse an existing file unless
    `overwrite`."""
    try:
        return write_atomically(path, data, mode=SECRET_MODE, overwrite=overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path} exists and holds a secret: it is never replaced by "
                              "accident; delete it or ask for an overwrite (--force)") from None


def read_secret(path: Path, what: str) -> bytes:
    """The bytes of a secret file, refused when group or others may read it.

    The mode is read from the open file descriptor, so a file swapped between the check and
    the read cannot slip through.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SecretFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        require_owner_only(path, os.fstat(handle.fileno()).st_mode, what)
        return handle.read()


def require_owner_only(path: Path, st_mode: int, what: str) -> None:
    """Refuse a secret file whose mode lets group or others read or write it."""
    mode = stat.S_IMODE(st_mode)
    if mode & 0o077:
        raise SecretFileError(f"{what} {path} has permissions {mode:04o}: a secret must be "
                              f"readable by its owner only; run `chmod 600 {path}`")

"""The on-disk key file: a one-line JSON header, TenSEAL's own context serialization, a checksum.

The header names the preset and carries a random federation id. TenSEAL's params-only
serialization is the same for every context built from one preset, so the fingerprint mixes
in the federation id: two `fedhealth keys init` runs never share a fingerprint. The sha256
trailer (`fedhealth.core.file_checksum`) covers the whole file: TenSEAL loaded 13 of 40
single-bit flips of a secret context without complaint, with the same fingerprint, and then
decrypted wrongly.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import tenseal as ts

from fedhealth.core.crypto.presets import CkksPreset, get_preset
from fedhealth.core.file_checksum import ChecksumError, verified_body, with_checksum

MAGIC = b"fedhealth-ckks-key/2\n"
_UNCHECKED_MAGIC = b"fedhealth-ckks-key/1\n"  # before checksums
_REMAKE = ("copy the file again from the federation's original, or create a federation's "
           "keys with `fedhealth keys init --out DIR`")


class KeyFileError(ValueError):
    """A key file is unreadable, or is the wrong kind for the party loading it."""


@dataclass(frozen=True)
class KeyFile:
    """A parsed key file: who it is for, its preset, federation id and TenSEAL bytes."""

    kind: str
    preset: CkksPreset
    federation: str
    context_bytes: bytes

    def to_bytes(self) -> bytes:
        header = {"kind": self.kind, "preset": self.preset.name, "federation": self.federation}
        return with_checksum(MAGIC + json.dumps(header).encode() + b"\n" + self.context_bytes)

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> "KeyFile":
        """Parse, naming `source` (usually the path) in every error."""
        if data.startswith(_UNCHECKED_MAGIC):
            raise KeyFileError(f"{source}: a key file of format 1, which has no checksum, so "
                               "damage cannot be told from a key; write the federation's keys "
                               "again with `fedhealth keys init --out DIR`")
        if not data.startswith(MAGIC):
            raise KeyFileError(f"{source}: not a fedhealth key file; {_REMAKE}")
        try:
            body = verified_body(data, source)
        except ChecksumError as exc:
            raise KeyFileError(f"{exc}; {_REMAKE}") from None
        header_line, sep, context_bytes = body[len(MAGIC):].partition(b"\n")
        try:
            header = json.loads(header_line)
            kind, preset, federation = header["kind"], header["preset"], header["federation"]
            preset = get_preset(preset)
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"{source}: damaged key file header ({exc}); {_REMAKE}") from None
        if not sep or not context_bytes:
            raise KeyFileError(f"{source}: key file is truncated (no TenSEAL context)")
        return cls(kind, preset, federation, context_bytes)

    def load_context(self, source: str) -> ts.Context:
        try:
            return ts.context_from(self.context_bytes)
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad bytes
            raise KeyFileError(f"{source}: TenSEAL cannot read the context ({exc})") from None

    def fingerprint(self, context: ts.Context) -> str:
        """Same for a federation's site and aggregator files: public parameters + federation id."""
        digest = hashlib.sha256(MAGIC + self.federation.encode() + params_only(context))
        return digest.hexdigest()[:32]


def params_only(context: ts.Context) -> bytes:
    """TenSEAL's serialization of the parameters alone: no secret, public, galois or relin key."""
    return context.serialize(save_public_key=False, save_secret_key=False,
                             save_galois_keys=False, save_relin_keys=False)


@dataclass(frozen=True, eq=False)
class LoadedKey:
    """A loaded context with its preset and fingerprint; subclasses say which contexts they accept."""

    context: ts.Context
    preset: CkksPreset
    fingerprint: str
    raw: bytes = field(repr=False)

    @classmethod
    def check(cls, context: ts.Context, source: str) -> None:
        """Raise KeyFileError when this party must not hold `context`."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "key file") -> Self:
        keyfile = KeyFile.from_bytes(raw, source)
        context = keyfile.load_context(source)
        cls.check(context, source)
        return cls(context, keyfile.preset, keyfile.fingerprint(context), raw)

    @classmethod
    def check_mode(cls, path: Path, st_mode: int) -> None:
        """Raise KeyFileError when the file's permissions do not suit what it holds."""

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Read, parse, check the kind, then the permissions (the mode of the file read, not
        of whatever the path names a moment later)."""
        path = Path(path)
        try:
            with path.open("rb") as handle:
                st_mode = os.fstat(handle.fileno()).st_mode
                raw = handle.read()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        loaded = cls.from_bytes(raw, str(path))
        cls.check_mode(path, st_mode)
        return loaded

    def __reduce__(self) -> tuple:
        """Pickle as the file bytes so Ray actors and subprocesses can rebuild the context."""
        return (type(self).from_bytes, (self.raw,))

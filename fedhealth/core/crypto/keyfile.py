"""The on-disk key file: a one-line JSON header, then TenSEAL's own context serialization.

The header names the preset and carries a random federation id. TenSEAL's params-only
serialization is the same for every context built from one preset, so the fingerprint mixes
in the federation id: two `fedhealth keys init` runs never share a fingerprint.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import tenseal as ts

from fedhealth.core.crypto.presets import CkksPreset, get_preset

MAGIC = b"fedhealth-ckks-key/1\n"


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
        return MAGIC + json.dumps(header).encode() + b"\n" + self.context_bytes

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> "KeyFile":
        """Parse, naming `source` (usually the path) in every error."""
        if not data.startswith(MAGIC):
            raise KeyFileError(f"{source}: not a fedhealth key file; create one with "
                               "`fedhealth keys init --out DIR`")
        header_line, sep, context_bytes = data[len(MAGIC):].partition(b"\n")
        try:
            header = json.loads(header_line)
            kind, preset, federation = header["kind"], header["preset"], header["federation"]
            preset = get_preset(preset)
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"{source}: damaged key file header ({exc})") from None
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
    def load(cls, path: Path | str) -> Self:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        return cls.from_bytes(raw, str(path))

    def __reduce__(self) -> tuple:
        """Pickle as the file bytes so Ray actors and subprocesses can rebuild the context."""
        return (type(self).from_bytes, (self.raw,))

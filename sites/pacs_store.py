"""The site folder as a cache of the PACS: where a pulled instance lives, and how it gets there.

Layout: DIR/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm, so "does the site have
this instance" is one `stat` and a second pull of the same cohort transfers nothing. An
instance arrives in a temporary file at the top of DIR (streamed: never held in memory), is
fsynced, checked to be the instance that was asked for, and only then renamed into place: a
pull killed at any moment leaves complete files and, at worst, temporary ones that the next
pull deletes first.
"""

import fcntl
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from sites.pacs_settings import is_uid

PARTIAL_PREFIX, PARTIAL_SUFFIX = ".fedhealth-pull-", ".partial"
_HEADER_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class MalformedInstance(ValueError):
    """What the PACS sent is not (a DICOM file of) an instance that was asked for."""


@dataclass(frozen=True)
class InstanceRef:
    """One instance as the PACS lists it; `sop_class` tells DIMSE which storage to offer."""

    study: str
    series: str
    sop: str
    sop_class: str = ""

    def __post_init__(self) -> None:
        """A PACS names the files: only UIDs (digits and dots) ever become path parts."""
        for name in ("study", "series", "sop"):
            if not is_uid(getattr(self, name)):
                raise MalformedInstance(f"the PACS listed an instance whose {name} UID "
                                        f"{getattr(self, name)!r} is not a DICOM UID")


class Incoming:
    """One instance being received: write its bytes, then `commit` (checked, renamed) or
    `discard`."""

    def __init__(self, store: "InstanceStore") -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.root, prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes | bytearray) -> None:
        self._file.write(data)
        self.size += len(data)

    def commit(self, expected: Mapping[str, InstanceRef]) -> InstanceRef:
        """Rename into place if the file is one of `expected` (keyed by SOPInstanceUID);
        MalformedInstance otherwise (the temporary file is then deleted)."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            ref = self._identify(expected)
            final = self._store.path(ref)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, final)
            return ref
        finally:
            self.discard()

    def discard(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)

    def _identify(self, expected: Mapping[str, InstanceRef]) -> InstanceRef:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(self._path, stop_before_pixels=True, force=True,
                                     specific_tags=list(_HEADER_TAGS))
                uids = [str(ds.get(tag, "")) for tag in _HEADER_TAGS]
            except (InvalidDicomError, OSError, ValueError, EOFError) as err:
                raise MalformedInstance(f"a {self.size}-byte reply is not a DICOM file ({err})") from None
        study, series, sop = uids
        ref = expected.get(sop)
        if ref is None:
            raise MalformedInstance(f"the PACS sent instance {sop or '(no SOPInstanceUID)'}, which "
                                    "was not asked for")
        if (study, series) != (ref.study, ref.series):
            raise MalformedInstance(f"instance {sop} arrived with study {study} / series {series}, "
                                    f"listed under study {ref.study} / series {ref.series}")
        return ref


class StoreBusy(RuntimeError):
    """Another pull is writing into the same folder."""


class InstanceStore:
    """The pulled files under `root`, for one pull at a time (an exclusive lock on the folder
    itself: no lock file among the site's files). Opening it deletes what a killed pull left
    behind; `close` releases the folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StoreBusy(f"another pull is writing into {self.root}; wait for it to end") from None
        for leftover in self.root.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self._lock)  # releases the lock

    def path(self, ref: InstanceRef) -> Path:
        return self.root / ref.study / ref.series / f"{ref.sop}.dcm"

    def has(self, ref: InstanceRef) -> bool:
        return self.path(ref).is_file()

    def incoming(self) -> Incoming:
        return Incoming(self)

"""Find a site's DICOM images in any folder tree and say why every other file cannot be used.

A hospital export mixes images with reports, structure sets, DICOMDIRs, truncated copies and files
that are not DICOM at all. Each file becomes either a `DicomImage` or a `Skipped` with a reason an
IT person can act on; nothing here raises for a bad file.
"""

import json
import warnings
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from monai.data import PydicomReader
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import MediaStorageDirectoryStorage

from fedhealth.core.atomic_file import write_atomically


class SiteDataError(ValueError):
    """A site folder holds nothing a model can train on (missing, empty, or no labeled image)."""


@dataclass(frozen=True)
class DicomImage:
    """One usable single-frame greyscale image and where it sits in the patient/study hierarchy."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    manufacturer: str
    monochrome1: bool  # stored dark-is-dense: the pipeline inverts it


@dataclass(frozen=True)
class Skipped:
    """A file (or a labels row) the site cannot use, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """Every file under a site folder: usable images plus skipped files (`files` = both)."""

    images: list[DicomImage]
    skipped: list[Skipped]

    @property
    def files(self) -> int:
        return len(self.images) + len(self.skipped)


def scan_tree(root: Path, *, ignore: Collection[Path] = (),
              on_file: Callable[[], None] | None = None,
              remember: Path | None = None) -> Scan:
    """Inspect every file under `root` (any names, any nesting) in sorted order.

    `ignore` holds files that are known not to be images (the labels file, its masks).
    `remember`: a JSON file of earlier inspections; a file whose size and modification time are
    unchanged is not decoded again (a site process restarts every run, its archive rarely changes).
    """
    ignored = {p.resolve() for p in ignore}
    known = _remembered(remember)
    seen: dict[str, dict[str, object]] = {}
    images: list[DicomImage] = []
    skipped: list[Skipped] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.resolve() in ignored:
            continue
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(str(path))
        result = _from_entry(path, entry) if entry and entry["stamp"] == stamp else inspect_file(path)
        seen[str(path)] = {"stamp": stamp, **_to_entry(result)}
        (images if isinstance(result, DicomImage) else skipped).append(result)  # type: ignore[arg-type]
        if on_file is not None:
            on_file()
    if remember is not None and seen != known:
        write_atomically(remember, json.dumps(seen).encode())
    return Scan(images, skipped)


def _remembered(path: Path | None) -> dict[str, dict[str, object]]:
    """Earlier inspections; an unreadable record is no record (everything is inspected again)."""
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _to_entry(result: DicomImage | Skipped) -> dict[str, object]:
    if isinstance(result, Skipped):
        return {"skipped": result.reason}
    return {"image": {**asdict(result), "path": str(result.path)}}


def _from_entry(path: Path, entry: dict[str, object]) -> DicomImage | Skipped:
    if "skipped" in entry:
        return Skipped(str(path), str(entry["skipped"]))
    return DicomImage(**{**entry["image"], "path": path})  # type: ignore[dict-item]


def inspect_file(path: Path) -> DicomImage | Skipped:
    """Read `path` fully (header and pixels) and return the image, or why it cannot be used."""
    with warnings.catch_warnings():  # pydicom warns about fixable quirks (padding, VR); not ours to show
        warnings.simplefilter("ignore")
        try:
            return _inspect(path)
        except _Unusable as err:
            return Skipped(str(path), str(err))
        except Exception as err:  # a malformed value can fail any access; the file is skipped, not fatal
            return Skipped(str(path), f"invalid DICOM ({_brief(err)})")


class _Unusable(Exception):
    """Raised inside `_inspect` with the reason a file is skipped."""


def _inspect(path: Path) -> DicomImage:
    if path.stat().st_size == 0:
        raise _Unusable("empty file")
    reader = PydicomReader(swap_ij=False)  # the reader the training pipeline decodes with
    try:
        ds = reader.read(path)
    except InvalidDicomError:
        raise _Unusable("not a DICOM Part 10 file (no 'DICM' prefix / File Meta header)") from None
    except Exception as err:  # pydicom raises many types for a damaged header
        raise _Unusable(f"unreadable DICOM header ({_brief(err)})") from None

    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if sop_class == MediaStorageDirectoryStorage:
        raise _Unusable("DICOMDIR: a media index, not an image")
    if "PixelData" not in ds:
        raise _Unusable(f"no pixel data ({sop_class.name if sop_class else 'unknown SOP class'})")
    if "SegmentSequence" in ds:
        raise _Unusable("a DICOM SEG object, not an image (give masks in the labels file's mask column)")
    if reason := _unsupported_pixels(ds):
        raise _Unusable(reason)
    missing = [k for k in ("StudyInstanceUID", "PatientID") if not str(ds.get(k, "")).strip()]
    if missing:
        raise _Unusable(f"no {' or '.join(missing)}: cannot join labels or split by patient")
    try:  # decoding is the only way to find truncated or corrupt pixel data
        reader.get_data(ds)
    except Exception as err:
        raise _Unusable(f"pixel data cannot be decoded ({_brief(err)}){_other_decoders(ds)}") from None
    return DicomImage(
        path=path, patient_id=str(ds.PatientID).strip(), study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")) or "unknown",
        manufacturer=str(ds.get("Manufacturer", "")) or "unknown",
        monochrome1=ds.PhotometricInterpretation == "MONOCHROME1",
    )


def _unsupported_pixels(ds: pydicom.Dataset) -> str | None:
    """Why this dataset's pixels are not a single greyscale frame we can decode, if they are not."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        return "no TransferSyntaxUID in the File Meta header"
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            return f"pixel data in {syntax.name} ({syntax}): no decoder exists for it in pydicom"
        if not decoder.is_available:
            return f"pixel data in {syntax.name}: no decoder installed{_other_decoders(ds)}"
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if ds.get("SamplesPerPixel", 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"colour image ({photometric or 'no PhotometricInterpretation'}): sites train on greyscale"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames): sites train on single 2D images"
    return None


def _other_decoders(ds: pydicom.Dataset) -> str:
    """'; to decode it: pip install ...' for the decoder plugins of this syntax that are not installed."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return ""
    missing = get_decoder(syntax).missing_dependencies
    fixes = " or ".join(f"pip install {dep.split(' - requires ')[-1]}" for dep in missing)
    return f"; to decode it: {fixes}" if fixes else ""


def _brief(err: Exception) -> str:
    """An exception as one short line (pydicom's decoder errors span several)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"

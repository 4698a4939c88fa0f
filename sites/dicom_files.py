"""Find a site's DICOM images in any folder tree and say why every other entry cannot be used.

A hospital export mixes images with reports, structure sets, DICOMDIRs, truncated copies, links,
pipes and files that are not DICOM at all, and a hostile file can declare a size whose decoding
alone would exhaust the machine. Each directory entry becomes either a `DicomImage` or a `Skipped`
with a reason an IT person can act on; nothing here raises for a bad file.

`SiteDicomReader` is the one acceptance path: the site check inspects a file with it and the
training pipeline decodes with it, so whatever the check accepts, training loads.

Colour (RGB, YBR_*, PALETTE COLOR) and multi-frame files are accepted: pydicom's decoders return
YBR as RGB, the reader looks palette indices up in the file's colour table, and every frame of a
multi-frame file is one 2D item (`DicomImage.frame`). The pipeline (`sites.pipeline_config`)
turns the colour into the model's channels.
"""

import json
import os
import stat
import threading
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import PydicomReader
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import (
    JPEG2000TransferSyntaxes,
    JPEGExtended12Bit,
    MediaStorageDirectoryStorage,
    RTDoseStorage,
)

from fedhealth.core.atomic_file import write_atomically
from sites.data_limits import MB, DataLimits
from sites.pipeline_config import NO_FRAME, SWAP_IJ

_DEFAULT_MAX_BYTES = DataLimits().max_image_bytes
# Held while pydicom's process-wide validation setting is switched (SiteDicomReader._get_meta_dict).
_PYDICOM_SETTINGS = threading.Lock()
# Elements larger than this (the pixel data) are read only when used, i.e. after the size check.
_DEFER_SIZE = "256 KB"
# PhotometricInterpretation -> SamplesPerPixel the site decodes. pydicom's decoders return YBR_FULL
# and YBR_FULL_422 as RGB (their `as_rgb` default) and the JPEG 2000 decoders undo YBR_ICT/YBR_RCT
# themselves; PALETTE COLOR indices are looked up by the reader.
_PHOTOMETRIC_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3,
                        "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3}
_JPEG2000_ONLY = ("YBR_ICT", "YBR_RCT")  # the component transforms of JPEG 2000, nowhere else


class SiteDataError(ValueError):
    """A site folder holds nothing a model can train on (missing, empty, or no labeled image)."""


class UnusableImage(ValueError):
    """A DICOM file the site does not decode or train on; the message is the reason."""


@dataclass(frozen=True)
class DicomImage:
    """One usable 2D image (a single-frame file, or one frame of a multi-frame file) and where it
    sits in the patient/study hierarchy. All frames of a file share its UIDs, hence its label
    and its patient's split."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    manufacturer: str
    monochrome1: bool  # stored dark-is-dense: the pipeline inverts it
    rows: int
    columns: int
    frame: int = NO_FRAME  # the frame's 0-based index in a multi-frame file; NO_FRAME: single-frame


@dataclass(frozen=True)
class Skipped:
    """A directory entry (or a labels row) the site cannot use, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """Every entry under a site folder: usable images (a multi-frame file gives one per frame)
    plus skipped entries; `files` counts the files both come from."""

    images: list[DicomImage]
    skipped: list[Skipped]

    @property
    def files(self) -> int:
        return len({image.path for image in self.images}) + len(self.skipped)


@dataclass(frozen=True)
class Listing:
    """A site folder's regular files, and every other entry with the reason it is not read."""

    files: list[Path]
    skipped: list[Skipped]


@dataclass(frozen=True)
class _Decoded:
    """A multi-frame file's decoded pixels, kept for the items of its other frames."""

    source: tuple[str, int, int]  # path, size, modification time
    dataset: pydicom.Dataset
    array: np.ndarray
    meta: dict


class SiteDicomReader(PydicomReader):
    """MONAI's PydicomReader that refuses, before decoding, what a site must not decode.

    Headers are read with large elements deferred, so the pixel data is neither read nor decoded
    until the declared size, layout and decoder have been checked; the decoded pixels must then
    have the declared shape and be finite after rescale. Raises `UnusableImage` with the reason.

    Returns pydicom's layout: (frames,) rows, columns (, 3 samples), the frames axis only for a
    multi-frame file, the samples axis for colour; YBR arrives as RGB (pydicom's decoders) and
    PALETTE COLOR is looked up here (`pydicom.pixels.apply_color_lut`), so colour is always RGB.
    A multi-frame file is one item per frame: its last decode is kept (one file, within the
    size limit) so that its frames' items, which the caches fill in order, decode it once.
    """

    def __init__(self, max_image_bytes: int = _DEFAULT_MAX_BYTES) -> None:
        super().__init__(swap_ij=SWAP_IJ, defer_size=_DEFER_SIZE)
        self.max_image_bytes = max_image_bytes
        self._last: _Decoded | None = None

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> Any:
        last = self._last  # one read: another thread may replace it meanwhile
        one = data[0] if isinstance(data, list | tuple) and len(data) == 1 else data  # LoadImage's
        if last is not None and isinstance(one, str | os.PathLike) and _source(one) == last.source:
            return last.dataset
        return super().read(data, **kwargs)

    def _get_meta_dict(self, img: pydicom.Dataset) -> dict:
        # MONAI builds the metadata with pydicom's to_json_dict(suppress_invalid_tags=True), which
        # switches pydicom's process-wide reading validation to RAISE and back. Two threads (a
        # CacheDataset fills its cache on a thread pool) interleave that save and restore and can
        # leave it at RAISE, after which every file with a tolerated bad value fails to read.
        with _PYDICOM_SETTINGS:
            return super()._get_meta_dict(img)

    def get_data(self, data: pydicom.Dataset) -> tuple[np.ndarray, dict]:
        last = self._last
        if last is not None and last.dataset is data:
            return last.array, dict(last.meta)
        if reason := unsupported_pixels(data, self.max_image_bytes):
            raise UnusableImage(reason)
        try:
            array, meta = super().get_data(data)
        except Exception as err:  # decoding is the only way to find truncated or corrupt pixel data
            raise UnusableImage(f"pixel data cannot be decoded ({_brief(err)})"
                                f"{_other_decoders(data)}") from None
        frames, samples = _frames(data), int(data.get("SamplesPerPixel", 1))
        declared = ((frames,) if frames > 1 else ()) + (int(data.Rows), int(data.Columns)) + (
            (samples,) if samples > 1 else ())
        if array.shape != declared:
            raise UnusableImage(f"decoded pixels have shape {array.shape}, the header declares "
                                f"{' x '.join(map(str, declared))} ((NumberOfFrames x) Rows x "
                                "Columns (x SamplesPerPixel)): damaged header")
        if not array.dtype.isnative:  # Big Endian files: torch holds native byte order only
            array = array.astype(array.dtype.newbyteorder("="))
        if data.PhotometricInterpretation == "PALETTE COLOR":
            try:
                array = apply_color_lut(array, data)
            except Exception as err:  # a damaged or missing colour table
                raise UnusableImage(f"PALETTE COLOR image whose colour table cannot be applied "
                                    f"({_brief(err)}): fix or re-export the file") from None
        if not np.isfinite(array).all():
            slope, intercept = data.get("RescaleSlope", 1), data.get("RescaleIntercept", 0)
            raise UnusableImage(f"non-finite pixel values after rescale (RescaleSlope {slope}, "
                                f"RescaleIntercept {intercept}): fix the file's rescale values")
        filename = getattr(data, "filename", None)
        if frames > 1 and isinstance(filename, str):
            self._last = _Decoded(_source(filename), data, array, meta)
        return array, dict(meta)


def _source(path: str | os.PathLike) -> tuple[str, int, int]:
    """Which file, in which state: a file rewritten in place is decoded again."""
    try:
        status = os.stat(path)
    except OSError:
        return (str(path), -1, -1)
    return (os.path.realpath(path), status.st_size, status.st_mtime_ns)


def _frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames, 1 when absent (checked to be a positive integer by `declared_bytes`)."""
    return int(ds.get("NumberOfFrames") or 1)


def list_site(root: Path) -> Listing:
    """Every entry under `root`, in sorted order, without following links.

    Only regular files are read. A link is never followed (its target may be outside the site
    folder, or be read twice): it is listed with where it points. Pipes, sockets and devices are
    listed without being opened (opening a pipe blocks); folders that cannot be read are listed.
    """
    files: list[Path] = []
    skipped: list[Skipped] = []
    inside = Path(os.path.realpath(root))

    def walk(folder: Path) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append(Skipped(str(folder), f"folder cannot be read ({_brief(err)}): give the "
                                                "site's service account read access"))
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as err:
                skipped.append(Skipped(str(path), f"cannot be inspected ({_brief(err)})"))
                continue
            if stat.S_ISDIR(mode):
                walk(path)
            elif stat.S_ISREG(mode):
                files.append(path)
            elif stat.S_ISLNK(mode):
                skipped.append(Skipped(str(path), _link_reason(path, inside)))
            else:
                skipped.append(Skipped(str(path), f"a {_special_kind(mode)}, not a file"))

    walk(root)
    return Listing(files, skipped)


def _link_reason(path: Path, inside: Path) -> str:
    target = Path(os.path.join(path.parent, os.readlink(path)))
    try:
        resolved = target.resolve(strict=True)
    except FileNotFoundError:
        return f"dangling symbolic link (to {target}, which does not exist)"
    except (OSError, RuntimeError) as err:  # a loop of links
        return f"symbolic link that cannot be resolved ({_brief(err)})"
    if not resolved.is_relative_to(inside):
        return (f"symbolic link to {resolved}, outside the site folder: links are not followed; "
                "copy the file into the site folder")
    return f"symbolic link to {resolved}, inside the site folder: read there, not through the link"


def _special_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO (named pipe)", stat.S_ISSOCK: "socket",
             stat.S_ISCHR: "character device", stat.S_ISBLK: "block device"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def scan_tree(root: Path, *, ignore: Collection[Path] = (),
              on_file: Callable[[], None] | None = None, remember: Path | None = None,
              max_image_bytes: int = _DEFAULT_MAX_BYTES) -> Scan:
    """Inspect every entry under `root` (any names, any nesting) in sorted order.

    `ignore` holds files that are known not to be images (the labels file, its masks).
    `remember`: a JSON file of earlier inspections; a file whose size and modification time are
    unchanged (and the size limit with them) is not decoded again (a site process restarts every
    run, its archive rarely changes).
    """
    ignored = {os.path.realpath(p) for p in ignore}  # realpath: a loop of links does not raise
    known = _remembered(remember)
    seen: dict[str, dict[str, object]] = {}
    listing = list_site(root)
    images: list[DicomImage] = []
    skipped = [s for s in listing.skipped if os.path.realpath(s.path) not in ignored]  # used links
    for path in listing.files:
        if os.path.realpath(path) in ignored:
            continue
        stamp = _stamp(path, max_image_bytes)
        entry = known.get(str(path))
        result = (_from_entry(path, entry) if entry and entry["stamp"] == stamp
                  else inspect_file(path, max_image_bytes))
        seen[str(path)] = {"stamp": stamp, **_to_entry(result)}
        if isinstance(result, Skipped):
            skipped.append(result)
        else:
            images.extend(result)
        if on_file is not None:
            on_file()
    if remember is not None and seen != known:
        write_atomically(remember, json.dumps(seen).encode())
    return Scan(images, sorted(skipped, key=lambda s: s.path))


def _stamp(path: Path, max_image_bytes: int) -> list[int]:
    """What must be unchanged for an earlier inspection to still hold."""
    stamp = file_stamp(path)
    return [*stamp, max_image_bytes] if stamp else []  # gone meanwhile: inspected again


def file_stamp(path: str | Path) -> list[int]:
    """A file's size and modification time, which change when it is rewritten; [] if it is not
    there (or is no file one can stat)."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return []
    return [status.st_size, status.st_mtime_ns]


def _remembered(path: Path | None) -> dict[str, dict[str, object]]:
    """Earlier inspections; an unreadable record is no record (everything is inspected again)."""
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _to_entry(result: list[DicomImage] | Skipped) -> dict[str, object]:
    if isinstance(result, Skipped):
        return {"skipped": result.reason}
    return {"images": [{**asdict(image), "path": str(image.path)} for image in result]}


def _from_entry(path: Path, entry: dict[str, object]) -> list[DicomImage] | Skipped:
    if "skipped" in entry:
        return Skipped(str(path), str(entry["skipped"]))
    images: list[dict[str, Any]] = entry.get("images", [])  # type: ignore[assignment]
    return [DicomImage(**{**fields, "path": path}) for fields in images]


def inspect_file(path: Path,
                 max_image_bytes: int = _DEFAULT_MAX_BYTES) -> list[DicomImage] | Skipped:
    """Read `path` (header, then pixels if the header allows) and return its images (one per
    frame of a multi-frame file), or why it cannot be used."""
    with warnings.catch_warnings():  # pydicom warns about fixable quirks (padding, VR); not ours to show
        warnings.simplefilter("ignore")
        try:
            return _inspect(path, SiteDicomReader(max_image_bytes))
        except UnusableImage as err:
            return Skipped(str(path), str(err))
        except Exception as err:  # a malformed value can fail any access; the file is skipped, not fatal
            return Skipped(str(path), f"invalid DICOM ({_brief(err)})")


def _inspect(path: Path, reader: SiteDicomReader) -> list[DicomImage]:
    try:
        if path.stat().st_size == 0:
            raise UnusableImage("empty file")
        ds = reader.read(path)
    except InvalidDicomError:
        raise UnusableImage("not a DICOM Part 10 file (no 'DICM' prefix / File Meta header)") from None
    except OSError as err:
        raise UnusableImage(f"cannot be read ({_brief(err)}): give the site's service account "
                            "read access") from None
    except Exception as err:  # pydicom raises many types for a damaged header
        raise UnusableImage(f"unreadable DICOM header ({_brief(err)})") from None

    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if sop_class == MediaStorageDirectoryStorage:
        raise UnusableImage("DICOMDIR: a media index, not an image")
    if "PixelData" not in ds:
        raise UnusableImage(f"no pixel data ({sop_class.name if sop_class else 'unknown SOP class'})")
    if "SegmentSequence" in ds:
        raise UnusableImage("a DICOM SEG object, not an image (give masks in the labels file's "
                            "mask column)")
    if sop_class == RTDoseStorage:
        raise UnusableImage("an RT Dose grid (radiotherapy dose per voxel), not an image")
    missing = [k for k in ("StudyInstanceUID", "PatientID") if not str(ds.get(k, "")).strip()]
    if missing:
        raise UnusableImage(f"no {' or '.join(missing)}: cannot join labels or split by patient")
    reader.get_data(ds)  # the pixels exactly as training will decode them
    frames = _frames(ds)
    return [DicomImage(
        path=path, patient_id=str(ds.PatientID).strip(), study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")) or "unknown",
        manufacturer=str(ds.get("Manufacturer", "")) or "unknown",
        monochrome1=ds.PhotometricInterpretation == "MONOCHROME1",
        rows=int(ds.Rows), columns=int(ds.Columns), frame=frame,
    ) for frame in (range(frames) if frames > 1 else [NO_FRAME])]


def declared_bytes(ds: pydicom.Dataset) -> int:
    """rows x columns x frames x samples x bytes per sample, from the header alone.

    Raises UnusableImage when one of them is missing or not a positive integer.
    """
    size = 1
    for keyword, default in (("Rows", None), ("Columns", None), ("NumberOfFrames", 1),
                             ("SamplesPerPixel", 1), ("BitsAllocated", None)):
        value = ds.get(keyword, default)
        try:
            number = int(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            number = None
        if number is None or number < 1:
            raise UnusableImage(f"header field {keyword} is {value!r}: it must be a positive "
                                "integer to size the image")
        size *= -(-number // 8) if keyword == "BitsAllocated" else number
    return size


def unsupported_pixels(ds: pydicom.Dataset, max_image_bytes: int) -> str | None:
    """Why this dataset's pixels must not be decoded (too large, a colour model the site does not
    convert, no decoder), from the header alone; None when they may be."""
    try:
        size = declared_bytes(ds)
    except UnusableImage as err:
        return str(err)
    if size > max_image_bytes:
        return (f"declared image size {ds.Rows} x {ds.Columns} x {ds.get('NumberOfFrames', 1)} "
                f"frames x {ds.get('SamplesPerPixel', 1)} samples x {ds.BitsAllocated} bits = "
                f"{_mb(size)} MB exceeds the site's limit of {_mb(max_image_bytes)} MB: "
                "not decoded (raise max-image-mb in the site settings if the image is real)")
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
        if syntax == JPEGExtended12Bit and int(ds.get("BitsStored", 8)) > 8 and (
                "pylibjpeg" not in decoder.available_plugins):
            return (f"pixel data in {syntax.name} with {ds.BitsStored}-bit samples: no installed "
                    "decoder reads 12-bit JPEG (python-gdcm's build has none); the GPL-3.0 "
                    "pylibjpeg-libjpeg does (pip install 'fedhealth[jpeg-gpl]'), or re-export the "
                    "study as JPEG Lossless")
    return _unsupported_colour(ds, syntax)


def _unsupported_colour(ds: pydicom.Dataset, syntax: pydicom.uid.UID) -> str | None:
    """Why the site cannot turn this colour model into the model's channels, if it cannot."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = ds.get("SamplesPerPixel", 1)
    if photometric not in _PHOTOMETRIC_SAMPLES:
        return (f"PhotometricInterpretation {photometric or '(none)'}: the site reads "
                f"{', '.join(_PHOTOMETRIC_SAMPLES)}; re-export the image in one of them")
    if samples != _PHOTOMETRIC_SAMPLES[photometric]:
        return (f"{photometric} with SamplesPerPixel {samples}: {photometric} has "
                f"{_PHOTOMETRIC_SAMPLES[photometric]}: damaged header")
    if photometric in _JPEG2000_ONLY and syntax not in JPEG2000TransferSyntaxes:
        return (f"{photometric} in {syntax.name}: that colour transform exists only in JPEG 2000 "
                "pixel data: damaged header")
    return None


def _mb(size: int) -> str:
    megabytes = size / MB
    return f"{megabytes:,.1f}" if megabytes >= 1 else f"{megabytes:.3g}"


def _other_decoders(ds: pydicom.Dataset) -> str:
    """'; to decode it: pip install ...' for the decoder plugins of this syntax that are not installed."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return ""
    try:
        missing = get_decoder(syntax).missing_dependencies
    except NotImplementedError:
        return ""
    fixes = " or ".join(f"pip install {dep.split(' - requires ')[-1]}" for dep in missing)
    return f"; to decode it: {fixes}" if fixes else ""


def _brief(err: Exception) -> str:
    """An exception as one short line (pydicom's decoder errors span several)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"

"""CT/MR series and Enhanced multi-frame objects as volumes: which slices form one, in what order.

A volume is a stack of parallel slices of one size, evenly spaced along their normal. Its slices
are the single-frame files of one SeriesInstanceUID (CT/MR Image Storage), or the frames of one
Enhanced (multi-frame) CT/MR object, whose per-frame functional groups (PlanePositionSequence,
PlaneOrientationSequence, PixelMeasuresSequence, PixelValueTransformationSequence) say where each
frame is. Slices are ordered by ImagePositionPatient projected on the ImageOrientationPatient
normal, never by file name or InstanceNumber: archives renumber, and feet-first scans count the
other way.

MONAI's PydicomReader does read a series folder, but it sorts by InstanceNumber, measures the
spacing from the z coordinate alone, averages it (a missing slice only shifts the average) and
only warns about mixed sizes and spacings; its affine is the identity for Enhanced objects. So the
geometry is planned here, from pydicom headers, and checked: a series with a missing slice, two
orientations, uneven spacing, mixed sizes or slices off its normal is not a volume, with a reason
naming the series. Decoding stays with the site's reader (`SiteDicomReader`, per slice), so a
volume's slices pass exactly the checks a 2D image does.
"""

import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pydicom
from monai.config import PathLike
from monai.data import ImageReader
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys

from sites.data_limits import DataLimits
from sites.dicom_files import (
    DicomImage,
    SiteDicomReader,
    Skipped,
    UnusableImage,
    declared_bytes,
)

# Positions closer than this (mm) along the normal are the same place; spacings within this
# share of the series' step are the same step.
_SAME_PLACE_MM = 1e-3
_STEP_TOLERANCE = 0.01
# Direction cosines within this are one orientation.
_SAME_DIRECTION = 1e-4


@dataclass(frozen=True)
class Frame:
    """One slice as its header places it: a single-frame file, or frame `frame` (1-based) of a
    multi-frame one. `rescale` is an Enhanced frame's (slope, intercept); single-frame files
    are rescaled by the site reader."""

    path: str
    frame: int | None
    sop_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, ...]  # the six direction cosines: row, then column direction
    pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
    shape: tuple[int, int]
    rescale: tuple[float, float] = (1.0, 0.0)


@dataclass(frozen=True)
class Volume:
    """One usable volume: its frames in order along the slice normal, and whose it is.

    `affine` maps (row, column, slice) indices to RAS millimetres, as MONAI's readers give it.
    """

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    manufacturer: str
    frames: tuple[Frame, ...]
    affine: tuple[tuple[float, ...], ...]

    @property
    def files(self) -> list[str]:
        """The distinct files holding the frames, in frame order (one for an Enhanced object)."""
        return list(dict.fromkeys(f.path for f in self.frames))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, columns, slices): the assembled array's shape, and a mask's."""
        return (*self.frames[0].shape, len(self.frames))

    @property
    def enhanced(self) -> bool:
        return self.frames[0].frame is not None


@dataclass(frozen=True)
class VolumeScan:
    """A site's volumes, the series that could not be assembled (one Skipped per series, its
    path the series' folder), and the files only volumes use (Enhanced objects the 2D scan
    skipped)."""

    volumes: list[Volume]
    problems: list[Skipped]
    volume_only_files: set[str]


class SeriesProblem(ValueError):
    """Why a series (or an Enhanced object) is not one volume; the message says."""


def find_volumes(images: Sequence[DicomImage], skipped: Sequence[Skipped]) -> VolumeScan:
    """Group the usable images by SeriesInstanceUID and assemble each series of two or more
    positioned slices into a volume; also every Enhanced multi-frame CT/MR object, whether the
    2D scan used it frame-wise or skipped it (a 2D-only site then has none).

    Images without patient geometry (radiographs, secondary captures) and single positioned
    images are 2D only: neither a volume nor a problem.
    """
    by_series: dict[str, list[DicomImage]] = defaultdict(list)
    for image in images:
        by_series[image.series_uid].append(image)
    used = {str(i.path) for i in images}
    candidates = [s.path for s in skipped
                  if s.path not in used and os.path.isfile(s.path) and not os.path.islink(s.path)]
    volumes: list[Volume] = []
    problems: list[Skipped] = []
    volume_only: set[str] = set()
    for series_uid, members in sorted(by_series.items()):
        paths = sorted({str(m.path) for m in members})
        if len(paths) == 1 and len(members) == 1:
            continue  # one single-frame image: 2D only, no header to read again
        kinds = [(p, ds, _kind(ds)) for p in paths if (ds := _header(p)) is not None]
        multi = [(p, ds) for p, ds, kind in kinds if kind == "enhanced"]
        single = [(p, ds) for p, ds, kind in kinds if kind == "positioned"]
        for path, ds in multi:
            _add(volumes, problems, partial(enhanced_volume, path, ds), series_uid, [path])
        if len(single) >= 2:
            files = [p for p, _ in single]
            _add(volumes, problems, partial(series_volume, files, [ds for _, ds in single]),
                 series_uid, files)
    for candidate in candidates:
        header = _header(candidate)
        if header is None or _kind(header) != "enhanced" or not _identified(header):
            continue
        if _add(volumes, problems, partial(enhanced_volume, candidate, header),
                str(header.get("SeriesInstanceUID", "")), [candidate]):
            volume_only.add(candidate)
    return VolumeScan(volumes, sorted(problems, key=lambda s: s.path), volume_only)


def _add(volumes: list[Volume], problems: list[Skipped], build: Callable[[], Volume], series_uid: str,
         files: Sequence[str]) -> bool:
    try:
        volumes.append(build())
        return True
    except Exception as err:  # SeriesProblem, or a malformed header value pydicom cannot convert
        problems.append(Skipped(_folder(files), f"series {series_uid} ({len(files)} "
                                                f"file{'s' if len(files) > 1 else ''}): {err}"))
        return False


def _folder(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else os.path.commonpath(files)


def _header(path: str) -> pydicom.Dataset | None:
    """The header, pixel data left unread; None when pydicom cannot read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the 2D scan already gave this file its reason
            return None


def _kind(ds: pydicom.Dataset) -> str | None:
    """"enhanced" (a multi-frame object with per-frame geometry), "positioned" (a single-frame
    slice with patient geometry) or None (2D only, or a header value that cannot be read)."""
    try:
        if _is_enhanced(ds):
            return "enhanced"
        return "positioned" if _has_geometry(ds) else None
    except Exception:  # pydicom converts values on access: a malformed one raises here
        return None


def _is_enhanced(ds: pydicom.Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds \
        and "SegmentSequence" not in ds


def _has_geometry(ds: pydicom.Dataset) -> bool:
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _identified(ds: pydicom.Dataset) -> bool:
    return all(str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "PatientID"))


def series_volume(paths: Sequence[str], headers: Sequence[pydicom.Dataset]) -> Volume:
    """The volume of one series' single-frame files (any order); SeriesProblem if they are not."""
    frames = [_single_frame(p, ds) for p, ds in zip(paths, headers)]
    return _volume(headers[0], _ordered(frames))


def enhanced_volume(path: str, ds: pydicom.Dataset) -> Volume:
    """The volume of one Enhanced multi-frame object, from its functional groups."""
    count = int(ds.NumberOfFrames)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != count:
        raise SeriesProblem(f"{len(per_frame)} per-frame functional groups for {count} frames")
    shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]

    def group(i: int, name: str) -> pydicom.Dataset:
        for source in (per_frame[i], shared):
            if name in source and len(source[name].value):
                return source[name].value[0]
        raise SeriesProblem(f"frame {i + 1} has no {name} (per-frame or shared)")

    frames = []
    for i in range(count):
        measures, transform = group(i, "PixelMeasuresSequence"), _optional(per_frame[i], shared)
        frames.append(Frame(
            path=path, frame=i + 1, sop_uid=str(ds.SOPInstanceUID),
            position=_floats(group(i, "PlanePositionSequence"), "ImagePositionPatient",  # type: ignore[arg-type]
                             3),
            orientation=_floats(group(i, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
            pixel_spacing=_floats(measures, "PixelSpacing", 2),  # type: ignore[arg-type]
            shape=(int(ds.Rows), int(ds.Columns)),
            rescale=(float(transform.get("RescaleSlope", 1)),
                     float(transform.get("RescaleIntercept", 0)))))
    return _volume(ds, _ordered(frames))


def _optional(per_frame: pydicom.Dataset, shared: pydicom.Dataset) -> pydicom.Dataset:
    """A frame's PixelValueTransformationSequence item (per-frame, else shared, else none)."""
    for source in (per_frame, shared):
        if "PixelValueTransformationSequence" in source:
            return source.PixelValueTransformationSequence[0]
    return pydicom.Dataset()


def _single_frame(path: str, ds: pydicom.Dataset) -> Frame:
    return Frame(path=path, frame=None, sop_uid=str(ds.get("SOPInstanceUID", "")),
                 position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
                 orientation=_floats(ds, "ImageOrientationPatient", 6),
                 pixel_spacing=_floats(ds, "PixelSpacing", 2),  # type: ignore[arg-type]
                 shape=(int(ds.Rows), int(ds.Columns)))


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in ds.get(keyword) or ())
    except (TypeError, ValueError):
        values = ()
    if len(values) != count or not np.isfinite(values).all():
        raise SeriesProblem(f"{keyword} is {ds.get(keyword)!r}: {count} finite numbers needed")
    return values


def _ordered(frames: list[Frame]) -> list[Frame]:
    """The frames sorted along their common normal, after checking they stack into a volume."""
    orientations = _distinct(f.orientation for f in frames)
    if len(orientations) > 1:
        raise SeriesProblem(f"{len(orientations)} orientations in one series "
                            f"(ImageOrientationPatient {', '.join(map(_cosines, orientations))}): "
                            "export each orientation as its own series")
    sizes = sorted({f.shape for f in frames})
    if len(sizes) > 1:
        raise SeriesProblem(f"mixed slice sizes {', '.join(f'{r} x {c}' for r, c in sizes)} "
                            "(Rows x Columns)")
    spacings = _distinct(f.pixel_spacing for f in frames)
    if len(spacings) > 1:
        raise SeriesProblem(f"mixed pixel spacings {', '.join(map(_cosines, spacings))} mm")
    row, column = np.asarray(frames[0].orientation[:3]), np.asarray(frames[0].orientation[3:])
    normal = np.cross(row, column)
    if not np.isclose(np.linalg.norm(normal), 1, atol=1e-3):
        raise SeriesProblem(f"ImageOrientationPatient {_cosines(frames[0].orientation)} is not "
                            "two perpendicular unit vectors")
    positions = np.asarray([f.position for f in frames])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    if (steps < _SAME_PLACE_MM).any():
        at = float(along[1:][steps < _SAME_PLACE_MM][0])
        raise SeriesProblem(f"two slices at the same position ({at:.2f} mm along the normal): "
                            "duplicate or overlapping acquisitions in one series")
    across = positions - np.outer(along, normal)  # in-plane offset of each slice's corner
    if np.abs(across - across[0]).max() > max(frames[0].pixel_spacing) / 2:
        raise SeriesProblem("slices are not stacked along their normal (their corners drift "
                            "in plane: gantry tilt or mixed scan positions)")
    if len(steps):
        step = float(np.median(steps))
        off = np.abs(steps - step) > _STEP_TOLERANCE * step + _SAME_PLACE_MM
        if off.any():
            gap = float(steps[off].max())
            i = int(np.flatnonzero(steps == gap)[0])
            missing = round(gap / step) - 1
            if missing >= 1 and abs(gap - (missing + 1) * step) <= _STEP_TOLERANCE * gap:
                raise SeriesProblem(f"missing slice{'s' if missing > 1 else ''}: a gap of "
                                    f"{gap:.2f} mm between positions {along[i]:.2f} and "
                                    f"{along[i + 1]:.2f} mm, where slices are {step:.2f} mm "
                                    f"apart ({missing} slice{'s' if missing > 1 else ''} missing)")
            raise SeriesProblem(f"inconsistent slice spacing: steps from {steps.min():.2f} to "
                                f"{steps.max():.2f} mm along the normal")
    return [frames[i] for i in order]


def _distinct(values: Iterable[tuple[float, ...]]) -> list[tuple[float, ...]]:
    kept: list[tuple[float, ...]] = []
    for v in values:
        if not any(np.allclose(v, k, atol=_SAME_DIRECTION, rtol=0) for k in kept):
            kept.append(v)
    return kept


def _cosines(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _volume(ds: pydicom.Dataset, frames: list[Frame]) -> Volume:
    first = frames[0]
    row, column = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    affine = np.eye(4)
    affine[:3, 0] = column * first.pixel_spacing[0]  # down the rows
    affine[:3, 1] = row * first.pixel_spacing[1]  # along a row
    affine[:3, 2] = ((np.asarray(frames[-1].position) - first.position) / (len(frames) - 1)
                     if len(frames) > 1 else np.cross(row, column))
    affine[:3, 3] = first.position
    ras = orientation_ras_lps(affine)
    return Volume(series_uid=str(ds.get("SeriesInstanceUID", "")),
                  study_uid=str(ds.StudyInstanceUID), patient_id=str(ds.PatientID).strip(),
                  modality=str(ds.get("Modality", "")) or "unknown",
                  manufacturer=str(ds.get("Manufacturer", "")) or "unknown",
                  frames=tuple(frames), affine=tuple(tuple(float(v) for v in r) for r in ras))


class SeriesVolumeReader(ImageReader):
    """A MONAI image reader (for `LoadImage`) of one volume given as its files in any order.

    The order is planned again from the headers (the same checks as the site scan), single-frame
    slices decode through `SiteDicomReader` (size limit, rescale, finite values), an Enhanced
    object's frames through pydicom with each frame's rescale. Output: float32 array
    (rows, columns, slices) and MONAI metadata with the RAS affine.
    """

    def __init__(self, max_image_bytes: int = DataLimits().max_image_bytes) -> None:
        super().__init__()
        self.max_image_bytes = max_image_bytes

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return True  # DICOM files need no suffix

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: object) -> list[str]:
        return [str(p) for p in ([data] if isinstance(data, (str, os.PathLike)) else data)]

    def get_data(self, img: list[str]) -> tuple[np.ndarray, dict]:
        volume = load_volume_plan(img)
        array = (self._enhanced_pixels(volume) if volume.enhanced
                 else np.stack([self._slice_pixels(f.path) for f in volume.frames], axis=-1))
        affine = np.asarray(volume.affine)
        meta = {MetaKeys.AFFINE: affine, MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape), MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"), "series_uid": volume.series_uid}
        return array.astype(np.float32), meta

    def _slice_pixels(self, path: str) -> np.ndarray:
        reader = SiteDicomReader(self.max_image_bytes)
        array, _ = reader.get_data(reader.read(path))
        return array

    def _enhanced_pixels(self, volume: Volume) -> np.ndarray:
        path = volume.files[0]
        ds = pydicom.dcmread(path, defer_size="256 KB")
        if (size := declared_bytes(ds)) > self.max_image_bytes:
            raise UnusableImage(f"{path}: declared size {size} bytes exceeds the site's limit "
                                f"of {self.max_image_bytes} (max-image-mb)")
        pixels = ds.pixel_array  # (frames, rows, columns)
        planes = [pixels[f.frame - 1].astype(np.float64) * f.rescale[0] + f.rescale[1]
                  for f in volume.frames if f.frame is not None]
        array = np.stack(planes, axis=-1)
        if not np.isfinite(array).all():
            raise UnusableImage(f"{path}: non-finite pixel values after rescale")
        return array


def load_volume_plan(files: Sequence[str]) -> Volume:
    """The volume `files` make (one Enhanced object, or a series' slices), or SeriesProblem."""
    headers = [_header(p) for p in files]
    if any(h is None for h in headers):
        raise SeriesProblem(f"unreadable header among {_folder(files)}")
    if len(files) == 1 and _is_enhanced(headers[0]):  # type: ignore[arg-type]
        return enhanced_volume(files[0], headers[0])  # type: ignore[arg-type]
    return series_volume(files, headers)  # type: ignore[arg-type]

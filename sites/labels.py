"""Join a site's label manifest (CSV) to its DICOM images, and check its masks.

A row is keyed by SOPInstanceUID when it has one, else by SeriesInstanceUID, else by
StudyInstanceUID (the label then holds for every image, and every volume, of the series or study).
Volumes (sites.series_volume) join by their series, else their study; their masks are `.npy`
volumes in the assembled order (rows, columns, slices along the normal), NIfTI files placed by
their affine (sites.nifti_masks) or DICOM SEG objects in the site folder that reference the
series (sites.seg_masks). An optional `split` column fixes
the row's split (train, val or test: a hospital's own held-out set); rows leaving it empty are
dealt by the site. A mask on a SeriesInstanceUID row is the series' volume mask: the series'
2D images join that row without it. Rows that match no image and images without a row are
reported, not fatal: a hospital's manifest and its PACS export rarely agree perfectly. What would
silently train on wrong data is refused: a label that is not a plain class number, two rows giving one key
different labels, a mask path leaving the site folder, a mask that does not fit its image.
"""

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhealth.core.crypto.wire import LABELS_FILE, LABELS_SPLIT_COLUMN, SPLITS
from sites.data_limits import DEFAULT_NUM_CLASSES
from sites.dicom_files import DicomImage, SiteDataError, Skipped
from sites.nifti_masks import is_nifti, nifti_mask
from sites.seg_masks import MaskProblem, seg_mask
from sites.series_volume import Volume

KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
# Python's int() also reads "1_0" (10), "٣" (3), " +1" and "1e20" is a float: labels are plain ASCII.
_PLAIN_INTEGER = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class LabelRow:
    line: int
    key: str  # one of KEYS
    uid: str
    label: int
    mask: Path | None
    split: str | None = None  # one of SPLITS, or None: the site deals it


@dataclass(frozen=True)
class LabeledVolume:
    """A volume with its class, for segmentation its mask (a `.npy` file or a DICOM SEG), and
    the split its row fixed."""

    volume: Volume
    label: int
    mask: Path | None
    split: str | None = None


@dataclass(frozen=True)
class Labeled:
    """An image with its class, for segmentation its mask file, and the split its row fixed."""

    image: DicomImage
    label: int
    mask: Path | None
    split: str | None = None


def default_labels(data_dir: Path) -> Path | None:
    """`labels.csv` at the top of the site folder, if there is one (a regular file, not a link)."""
    path = data_dir / LABELS_FILE
    if path.is_symlink():
        raise SiteDataError(f"labels file {path} is a symbolic link: put the file itself in the "
                            "site folder, or name the manifest with --labels / [site] labels")
    return path if path.is_file() else None


def read_labels(path: Path, *, site_dir: Path,
                num_classes: int = DEFAULT_NUM_CLASSES) -> tuple[list[LabelRow], list[Skipped]]:
    """Parse the manifest. Malformed rows are skipped with their line number; two rows giving
    one key different labels or masks raise SiteDataError naming both lines."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if "label" not in columns or not columns & set(KEYS):
                raise SiteDataError(
                    f"labels file {path} needs a 'label' column and a {', '.join(KEYS[:-1])} or "
                    f"{KEYS[-1]} column; it has {sorted(columns)}")
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"cannot read labels file {path}: {err}") from err

    inside = Path(os.path.realpath(site_dir))
    by_key: dict[tuple[str, str], LabelRow] = {}
    skipped = []
    for line, record in enumerate(records, start=2):
        try:
            row = _row(line, record, path, inside, num_classes)
        except ValueError as err:
            skipped.append(Skipped(str(path), f"row {line}: {err}"))
            continue
        first = by_key.setdefault((row.key, row.uid), row)
        if first is row:
            continue
        if (first.label, first.mask, first.split) != (row.label, row.mask, row.split):
            raise SiteDataError(
                f"labels file {path}: rows {first.line} and {line} both give {row.key} {row.uid}, "
                f"as label {first.label} (mask {first.mask}, split {first.split}) and label "
                f"{row.label} (mask {row.mask}, split {row.split}): keep the one that is right "
                "and delete the other")
        skipped.append(Skipped(str(path), f"row {line}: repeats row {first.line} (ignored)"))
    return list(by_key.values()), skipped


def _row(line: int, record: dict[str | None, object], path: Path, inside: Path,
         num_classes: int) -> LabelRow:
    """One manifest row, or ValueError with what is wrong with it."""
    uids = {k: v.strip() for k in KEYS if isinstance(v := record.get(k), str) and v.strip()}
    key = next((k for k in KEYS if k in uids), None)
    if key is None:
        raise ValueError(f"no {' or '.join(KEYS)}")
    text = record.get("label")
    text = text.strip() if isinstance(text, str) else ""
    if not _PLAIN_INTEGER.fullmatch(text) or int(text) >= num_classes:
        raise ValueError(f"label {text!r} is not a class: labels are plain integers 0 to "
                         f"{num_classes - 1} (digits 0-9 only)")
    mask = record.get("mask")
    mask = mask.strip() if isinstance(mask, str) else ""
    mask_path = path.parent / mask if mask else None
    # realpath follows links (a link out of the folder is refused) and, unlike resolve, never raises
    target = Path(os.path.realpath(mask_path)) if mask_path is not None else inside
    if not target.is_relative_to(inside):
        raise ValueError(f"mask path {mask!r} resolves to {target}, outside the site folder "
                         f"{inside}: masks must be files inside it")
    split = record.get(LABELS_SPLIT_COLUMN)
    split = split.strip() if isinstance(split, str) else ""
    if split and split not in SPLITS:
        raise ValueError(f"{LABELS_SPLIT_COLUMN} {split!r} is not one of {', '.join(SPLITS)} "
                         "(leave it empty for the site to deal the study)")
    return LabelRow(line, key, uids[key], int(text), mask_path, split or None)


def mask_problem(path: Path, image: DicomImage | Volume) -> str | None:
    """Why `path` cannot be the mask of `image` (a 2D image, or a volume of shape rows x
    columns x slices), if so: not a binary .npy array of its shape.

    The header is read first (memory-mapped), so a mask of a wrong shape is never loaded. A
    volume's mask may also be NIfTI, placed by its affine (sites.nifti_masks).
    """
    if isinstance(image, Volume) and is_nifti(path) and path.is_file():
        try:
            nifti_mask(path, image)
        except MaskProblem as err:
            return str(err)
        return None
    if path.suffix != ".npy" or not path.is_file():
        return "not an existing .npy file" + (" or NIfTI volume" if isinstance(image, Volume)
                                               else "")
    try:
        mask = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        return f"not a readable .npy array ({type(err).__name__}: {err})"
    shape = image.shape if isinstance(image, Volume) else (image.rows, image.columns)
    if mask.shape != shape:
        what = ("the volume is {} x {} x {} (rows x columns x slices)" if len(shape) == 3
                else "the image is {} x {} (Rows x Columns)").format(*shape)
        return f"shape {mask.shape}, {what}"
    if mask.dtype.kind not in "biuf":
        return f"dtype {mask.dtype}: masks hold numbers 0 and 1"
    values = np.unique(np.asarray(mask))
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(str(v) for v in values[~np.isin(values, (0, 1))][:3])
        return f"values other than 0 and 1 ({shown}): masks are binary"
    return None


def join_labels(images: list[DicomImage], rows: list[LabelRow],
                labels_path: Path) -> tuple[list[Labeled], list[Skipped]]:
    """Label every image that a row matches; report unlabeled studies, rows matching nothing and
    images whose mask does not fit them."""
    by_key = {(r.key, r.uid): r for r in rows}
    used: set[int] = set()
    labeled, skipped = [], []
    for image in images:
        row = _row_for(by_key, image.sop_uid, image.series_uid, image.study_uid)
        if row is None:
            skipped.append(Skipped(str(image.path), f"unlabeled study: StudyInstanceUID "
                                                    f"{image.study_uid} has no row in {labels_path}"))
            continue
        used.add(row.line)
        mask = row.mask if row.key != "SeriesInstanceUID" else None  # else the volume's mask
        if mask is not None and (problem := mask_problem(mask, image)):
            skipped.append(Skipped(str(image.path), f"mask {mask} (row {row.line} of "
                                                    f"{labels_path}): {problem}"))
            continue
        labeled.append(Labeled(image, row.label, mask, row.split))
    for row in rows:
        if row.line not in used:
            skipped.append(Skipped(str(labels_path), f"row {row.line}: {row.key} {row.uid} "
                                                     f"matches no usable image in the site"))
    return labeled, skipped


def _row_for(by_key: dict[tuple[str, str], LabelRow], *uids: str) -> LabelRow | None:
    """The most specific row for an item's (SOP instance, series, study) UIDs, in KEYS order."""
    return next((row for key, uid in zip(KEYS, uids) if uid and (row := by_key.get((key, uid)))),
                None)


def join_volume_labels(volumes: list[Volume], rows: list[LabelRow], labels_path: Path,
                       segmentations: dict[str, list[str]]) -> tuple[list[LabeledVolume],
                                                                      list[Skipped]]:
    """Label every volume a row matches by its series, else its study; its mask is the row's
    `.npy` file, else the DICOM SEG referencing its series (`segmentations`). A mask that does
    not fit is reported and the volume left out; rows matching no volume are not reported
    here (the 2D join reports rows that match nothing at all)."""
    by_key = {(r.key, r.uid): r for r in rows}
    labeled, skipped = [], []
    for volume in volumes:
        row = _row_for(by_key, "", volume.series_uid, volume.study_uid)
        folder = volume.files[0] if volume.enhanced else str(Path(volume.files[0]).parent)
        if row is None:
            skipped.append(Skipped(folder, f"unlabeled series {volume.series_uid}: neither it nor "
                                           f"its study {volume.study_uid} has a row in "
                                           f"{labels_path}"))
            continue
        mask, problem = row.mask, None
        if mask is not None:
            problem = mask_problem(mask, volume)
        elif volume.series_uid in segmentations:
            mask = Path(segmentations[volume.series_uid][0])
            try:
                seg_mask(mask, volume)
            except MaskProblem as err:
                problem = str(err)
        if problem:
            skipped.append(Skipped(folder, f"series {volume.series_uid}: mask {mask} (row "
                                           f"{row.line} of {labels_path}): {problem}"))
            continue
        labeled.append(LabeledVolume(volume, row.label, mask, row.split))
    return labeled, skipped

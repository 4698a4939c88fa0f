"""Join a site's label manifest (CSV) to its DICOM images.

A row is keyed by SOPInstanceUID when it has one, else by StudyInstanceUID (the label then holds
for every image of the study). Rows that match no image and images without a row are reported, not
fatal: a hospital's manifest and its PACS export rarely agree perfectly.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from sites.dicom_files import DicomImage, SiteDataError, Skipped

LABELS_FILE = "labels.csv"
KEYS = ("SOPInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class LabelRow:
    line: int
    key: str  # one of KEYS
    uid: str
    label: int
    mask: Path | None


@dataclass(frozen=True)
class Labeled:
    """An image with its class and, for segmentation, its mask file."""

    image: DicomImage
    label: int
    mask: Path | None


def default_labels(data_dir: Path) -> Path | None:
    """`labels.csv` at the top of the site folder, if there is one."""
    path = data_dir / LABELS_FILE
    return path if path.is_file() else None


def read_labels(path: Path) -> tuple[list[LabelRow], list[Skipped]]:
    """Parse the manifest; malformed rows are skipped with their line number."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if "label" not in columns or not columns & set(KEYS):
                raise SiteDataError(
                    f"labels file {path} needs a 'label' column and a StudyInstanceUID or "
                    f"SOPInstanceUID column; it has {sorted(columns)}")
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"cannot read labels file {path}: {err}") from err

    rows, skipped = [], []
    for line, record in enumerate(records, start=2):
        key = next((k for k in KEYS if (record.get(k) or "").strip()), None)
        try:
            label = int((record.get("label") or "").strip())
            if key is None or label < 0:
                raise ValueError
        except ValueError:
            skipped.append(Skipped(str(path), f"row {line}: needs a UID and a label that is an "
                                              f"integer >= 0, got {dict(record)}"))
            continue
        mask = (record.get("mask") or "").strip()
        rows.append(LabelRow(line, key, record[key].strip(), label,
                             path.parent / mask if mask else None))
    return rows, skipped


def join_labels(images: list[DicomImage], rows: list[LabelRow],
                labels_path: Path) -> tuple[list[Labeled], list[Skipped]]:
    """Label every image that a row matches; report unlabeled studies and rows matching nothing."""
    by_key = {(r.key, r.uid): r for r in rows}
    used: set[int] = set()
    labeled, skipped = [], []
    for image in images:
        row = by_key.get(("SOPInstanceUID", image.sop_uid)) or by_key.get(
            ("StudyInstanceUID", image.study_uid))
        if row is None:
            skipped.append(Skipped(str(image.path), f"unlabeled study: StudyInstanceUID "
                                                    f"{image.study_uid} has no row in {labels_path}"))
            continue
        used.add(row.line)
        labeled.append(Labeled(image, row.label, row.mask))
    for row in rows:
        if row.line not in used:
            skipped.append(Skipped(str(labels_path), f"row {row.line}: {row.key} {row.uid} "
                                                     f"matches no usable image in the site"))
    return labeled, skipped

"""A site's DICOM folder as train/val/test MONAI datasets of decoded, cached tensors.

Scan (sites.dicom_files) -> join labels (sites.labels) -> split by patient -> MONAI transforms,
run once per image by a CacheDataset (or PersistentDataset, to survive restarts), so training epochs
never decode DICOM again.
"""

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose
from torch.utils.data import Dataset

from fedhealth.core.crypto.wire import LABELS_SPLIT_COLUMN, SPLITS
from sites.data_limits import DataLimits
from sites.dicom_files import SiteDataError, Skipped, scan_tree
from sites.labels import Labeled, default_labels, join_labels, read_labels
from sites.pipeline_config import datalist_item, pipeline_steps, site_reader

__all__ = ["SiteDataError", "SiteIndex", "SiteSplits", "index_site", "load_site",
           "site_transforms", "split_patients"]

# Projection radiographs have no patient geometry, and there is no GPU decoder here: both are
# expected, so MONAI's per-file notices about them are silenced (targeted by message only).
warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

# Patients are dealt in this cycle after sorting by label: 60/20/20, stratified, and three patients
# already fill all three splits.
_DEAL = ("train", "val", "test", "train", "train")


@dataclass(frozen=True)
class SiteIndex:
    """What a site holds before any pixel is transformed: labeled images with their split."""

    name: str
    files: int
    images: list[Labeled]
    split: dict[str, str]  # PatientID -> "train" | "val" | "test"
    skipped: list[Skipped]
    labels_file: Path | None

    def in_split(self, split: str) -> list[Labeled]:
        return [x for x in self.images if self.split[x.image.patient_id] == split]


@dataclass
class SiteSplits:
    """Datasets of dicts {"image": [1,S,S] float32, "label": int64 (, "mask": [1,S,S] float32)}."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    skipped: list[Skipped]


def index_site(data_dir: Path, *, labels: Path | None = None, seed: int = 0,
               require_labels: bool = True, on_file: Callable[[], None] | None = None,
               remember: Path | None = None, limits: DataLimits = DataLimits()) -> SiteIndex:
    """Scan, label and split a site folder. Without a labels file (and `require_labels=False`),
    every decodable image is indexed with label -1. `remember`: see `scan_tree`.

    This is the one acceptance path: the site check reports it, `load_site` trains on it.
    """
    if not data_dir.is_dir():
        raise SiteDataError(f"site folder {data_dir} does not exist or is not a folder")
    labels = labels or default_labels(data_dir)
    if labels is None and require_labels:
        raise SiteDataError(f"site folder {data_dir} has no labels.csv: add one "
                            "(StudyInstanceUID,label) or pass --labels FILE")
    rows, skipped = (read_labels(labels, site_dir=data_dir, num_classes=limits.num_classes)
                     if labels else ([], []))
    ignore = [labels] + [r.mask for r in rows if r.mask] if labels else []
    scan = scan_tree(data_dir, ignore=ignore, on_file=on_file, remember=remember,
                     max_image_bytes=limits.max_image_bytes)
    if scan.files == 0:
        raise SiteDataError(f"site folder {data_dir} is empty: copy the site's DICOM export into it")
    skipped = scan.skipped + skipped
    if labels:
        images, unlabeled = join_labels(scan.images, rows, labels)
        skipped += unlabeled
    else:
        images = [Labeled(image, -1, None) for image in scan.images]
    patient_label: dict[str, int] = {}
    fixed: dict[str, str] = {}
    for x in images:
        patient = x.image.patient_id
        patient_label[patient] = max(x.label, patient_label.get(patient, -1))
        if x.split is None:
            continue
        if fixed.setdefault(patient, x.split) != x.split:
            raise SiteDataError(
                f"labels file {labels}: patient {patient} has studies in both the {fixed[patient]} "
                f"and the {x.split} split ({LABELS_SPLIT_COLUMN} column): one patient's images "
                "share a split, or the test split sees training patients. Give them one")
    return SiteIndex(data_dir.name, scan.files, images, split_patients(patient_label, seed, fixed),
                     skipped, labels)


def split_patients(patient_label: Mapping[str, int], seed: int,
                   fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Assign each patient to train/val/test: deterministic for `seed`, stratified by label.

    fixed: patients whose split the label manifest gives (kept); the others are dealt.
    """
    fixed = fixed or {}
    rng = np.random.default_rng(seed)
    dealt = sorted(set(patient_label) - set(fixed))
    shuffled = [dealt[i] for i in rng.permutation(len(dealt))]
    ordered = sorted(shuffled, key=lambda p: patient_label[p])  # stable: random within a class
    return {**{p: _DEAL[i % len(_DEAL)] for i, p in enumerate(ordered)},
            **{p: fixed[p] for p in patient_label if p in fixed}}


def site_transforms(image_size: int, task: str = "classification",
                    limits: DataLimits = DataLimits(), in_channels: int = 1) -> Compose:
    """DICOM file -> normalised tensor, the steps of `sites.pipeline_config` (the very dicts an
    exported bundle's inference config holds) read by the site's reader, which refuses files
    over `limits` before decoding; `in_channels`: the model's (1: luminance, 3: RGB).
    Deterministic, hence cacheable."""
    steps = pipeline_steps(image_size, site_reader(limits.max_image_bytes),
                           masks=task == "segmentation", in_channels=in_channels)
    return Compose(ConfigParser({"steps": steps}).get_parsed_content("steps"))


def load_site(data_dir: Path, *, labels: Path | None = None, image_size: int = 64, seed: int = 0,
              cache_dir: Path | None = None, task: str = "classification",
              limits: DataLimits = DataLimits(), in_channels: int = 1) -> SiteSplits:
    """Index `data_dir` and build its cached train/val/test datasets.

    cache_dir: keep decoded tensors (MONAI PersistentDataset) and the scan's inspections on disk,
    so a restarted site decodes neither again; otherwise tensors are cached in memory.
    limits: the site's (its settings), the same the site check applies.
    in_channels: the model's; a multi-frame file gives one item per frame (`DicomImage.frame`).
    """
    if task not in ("classification", "segmentation"):
        raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
    remember = cache_dir / f"{data_dir.name}-scan.json" if cache_dir is not None else None
    index = index_site(data_dir, labels=labels, seed=seed, remember=remember,
                       limits=limits)
    skipped = list(index.skipped)
    images = index.images
    if task == "segmentation":  # masks were checked against their images when labels were joined
        skipped += [Skipped(str(x.image.path), "no mask for segmentation (empty mask cell or no "
                                               "mask column)") for x in images if x.mask is None]
        images = [x for x in images if x.mask is not None]
    if not images:
        reasons = Counter(s.reason.split(" (")[0].split(":")[0] for s in skipped)
        raise SiteDataError(f"site folder {data_dir} has no usable labeled image "
                            f"({sum(reasons.values())} skipped: {dict(reasons.most_common(3))}); "
                            f"run `fedhealth site check {data_dir}` for details")
    transform = site_transforms(image_size, task, limits, in_channels)

    def dataset(split: str) -> Dataset:
        items = [_item(x, task) for x in images if index.split[x.image.patient_id] == split]
        if cache_dir is not None:
            folder = cache_dir / f"{index.name}-{task}-{image_size}-{in_channels}ch"
            return PersistentDataset(items, transform, cache_dir=folder)
        return CacheDataset(items, transform, progress=False, copy_cache=False, num_workers=None)

    return SiteSplits(index.name, train=dataset("train"), val=dataset("val"), test=dataset("test"),
                      num_classes=limits.num_classes, skipped=skipped)


def _item(x: Labeled, task: str) -> dict[str, object]:
    return datalist_item(str(x.image.path), x.label, x.image.monochrome1, x.image.frame,
                         mask=str(x.mask) if task == "segmentation" else None)


def class_counts(index: SiteIndex) -> dict[str, dict[str, int]]:
    """Labeled images per split and class, as the site check reports them."""
    return {split: dict(sorted(Counter(str(x.label) for x in index.in_split(split)).items()))
            for split in SPLITS}



"""A site's DICOM folder as train/val/test MONAI datasets of decoded, cached tensors.

Scan (sites.dicom_files) -> assemble series into volumes (sites.series_volume) -> join labels
(sites.labels) -> split by patient -> MONAI transforms, run once per image or volume by a
CacheDataset (or PersistentDataset, to survive restarts), so training epochs never decode DICOM
again. A 2D model trains on the images, a 3D model on the volumes (sites.volume_pipeline).
"""

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser
from monai.data import CacheDataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose
from torch.utils.data import Dataset

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.wire import LABELS_SPLIT_COLUMN, SPLITS
from fedhealth.core.models import model_spec
from sites.data_limits import DataLimits
from sites.dicom_files import SiteDataError, Skipped, file_stamp, scan_tree
from sites.labels import (
    Labeled,
    LabeledVolume,
    default_labels,
    join_labels,
    join_volume_labels,
    read_labels,
)
from sites.pipeline_config import datalist_item, pipeline_steps, site_reader
from sites.seg_masks import segmentations_by_series
from sites.series_volume import find_volumes
from sites.volume_pipeline import volume_item, volume_transforms

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
    """What a site holds before any pixel is transformed: labeled images and volumes with their
    split. `skipped`: files (and labels rows) not used; `series_skipped`: series (or Enhanced
    objects) that are not a usable volume, one entry each, their path the series' folder."""

    name: str
    files: int
    images: list[Labeled]
    split: dict[str, str]  # PatientID -> "train" | "val" | "test"
    skipped: list[Skipped]
    labels_file: Path | None
    volumes: list[LabeledVolume] = field(default_factory=list)
    series_skipped: list[Skipped] = field(default_factory=list)

    def in_split(self, split: str) -> list[Labeled]:
        return [x for x in self.images if self.split[x.image.patient_id] == split]

    def volumes_in_split(self, split: str) -> list[LabeledVolume]:
        return [x for x in self.volumes if self.split[x.volume.patient_id] == split]


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
    found = find_volumes(scan.images, scan.skipped)
    segmentations = segmentations_by_series(scan.skipped)
    series_skipped = list(found.problems)
    if labels:
        images, unlabeled = join_labels(scan.images, rows, labels)
        skipped += unlabeled
        volumes, unusable = join_volume_labels(found.volumes, rows, labels, segmentations)
        series_skipped += unusable
    else:
        images = [Labeled(image, -1, None) for image in scan.images]
        volumes = [LabeledVolume(v, -1, Path(segmentations[v.series_uid][0])
                                 if v.series_uid in segmentations else None)
                   for v in found.volumes]
    # Enhanced objects only volumes use, and SEG objects that are masks, are used, not skipped
    used = found.volume_only_files | {str(x.mask) for x in volumes if x.mask is not None}
    skipped = [s for s in scan.skipped if s.path not in used] + skipped
    patient_label: dict[str, int] = {}
    fixed: dict[str, str] = {}
    for patient, label, split in ([(x.image.patient_id, x.label, x.split) for x in images]
                                  + [(x.volume.patient_id, x.label, x.split) for x in volumes]):
        patient_label[patient] = max(label, patient_label.get(patient, -1))
        if split is None:
            continue
        if fixed.setdefault(patient, split) != split:
            raise SiteDataError(
                f"labels file {labels}: patient {patient} has studies in both the {fixed[patient]} "
                f"and the {split} split ({LABELS_SPLIT_COLUMN} column): one patient's images "
                "share a split, or the test split sees training patients. Give them one")
    return SiteIndex(data_dir.name, scan.files, images, split_patients(patient_label, seed, fixed),
                     skipped, labels, volumes, series_skipped)


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


def site_cache_dir(state_dir: Path) -> Path:
    """Where a site keeps its decoded tensors and the record of its scan, under its state folder."""
    return state_dir / "cache"


def scan_record(cache_dir: Path, data_dir: Path) -> Path:
    """The file of `data_dir`'s earlier inspections in `cache_dir` (`scan_tree`'s `remember`):
    whoever scans the folder first (a site check, a training run) saves the next one decoding."""
    return cache_dir / f"{data_dir.name}-scan.json"


def load_site(data_dir: Path, *, labels: Path | None = None, image_size: int = 64, seed: int = 0,
              cache_dir: Path | None = None, task: str = "classification",
              volume_depth: int | None = None,
              limits: DataLimits = DataLimits(), in_channels: int = 1) -> SiteSplits:
    """Index `data_dir` and build its cached train/val/test datasets.

    cache_dir: keep decoded tensors (MONAI PersistentDataset) and the scan's inspections on disk,
    so a restarted site decodes neither again; otherwise tensors are cached in memory.
    limits: the site's (its settings), the same the site check applies.
    volume_depth: for a 3D model: its items are the site's volumes, resized to image_size x
        image_size x volume_depth; None (2D): its items are the images.
    in_channels: the model's; a multi-frame file gives one item per frame (`DicomImage.frame`).
    """
    if task not in ("classification", "segmentation"):
        raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
    remember = scan_record(cache_dir, data_dir) if cache_dir is not None else None
    index = index_site(data_dir, labels=labels, seed=seed, remember=remember,
                       limits=limits)
    if volume_depth is not None:
        return _volume_splits(data_dir, index, (image_size, volume_depth), task, cache_dir,
                              limits)
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
        return _decoded(items, transform, cache_dir and
                        cache_dir / f"{index.name}-{task}-{image_size}-{in_channels}ch")

    return SiteSplits(index.name, train=dataset("train"), val=dataset("val"), test=dataset("test"),
                      num_classes=limits.num_classes, skipped=skipped)


def _decoded(items: list[dict[str, object]], transform: Compose, folder: Path | None) -> Dataset:
    """Items decoded once: into `folder` on disk (kept across runs), or in memory."""
    if folder is not None:
        return PersistentDataset(items, transform, cache_dir=folder, hash_func=cache_key)
    return CacheDataset(items, transform, progress=False, copy_cache=False, num_workers=None)


def cache_key(item: Mapping[str, object]) -> bytes:
    """An item's key in the disk cache: its fields and the size and modification time of every
    file it names. MONAI's default hashes the fields alone, so a file rewritten in place (a
    federation synthesized again into the same folder) would train on its old pixels."""
    stamps = [file_stamp(p) for value in item.values()
              for p in (value if isinstance(value, list | tuple) else [value]) if isinstance(p, str)]
    return pickle_hashing({**item, "file stamps": stamps})


def _item(x: Labeled, task: str) -> dict[str, object]:
    return datalist_item(str(x.image.path), x.label, x.image.monochrome1, x.image.frame,
                         mask=str(x.mask) if task == "segmentation" else None)


def _volume_splits(data_dir: Path, index: SiteIndex, grid: tuple[int, int], task: str,
                   cache_dir: Path | None, limits: DataLimits) -> SiteSplits:
    """A 3D model's datasets: the site's labeled volumes (with masks, for segmentation)."""
    skipped = [*index.skipped, *index.series_skipped]
    volumes = index.volumes
    if task == "segmentation":
        skipped += [Skipped(x.volume.files[0], f"series {x.volume.series_uid}: no mask for "
                                               "segmentation (no mask cell and no DICOM SEG "
                                               "referencing it)")
                    for x in volumes if x.mask is None]
        volumes = [x for x in volumes if x.mask is not None]
    if not volumes:
        raise SiteDataError(f"site folder {data_dir} has no usable labeled volume (a CT/MR "
                            f"series or Enhanced object; {len(index.series_skipped)} series "
                            f"skipped) for a 3D model: run `fedhealth site check {data_dir}` "
                            "for details, or choose a 2D model")
    transform = volume_transforms(grid[0], grid[1], masks=task == "segmentation",
                                  limits=limits)
    usable = set(volumes)

    def dataset(split: str) -> Dataset:
        items = [volume_item(x, task) for x in index.volumes_in_split(split) if x in usable]
        return _decoded(items, transform,
                        cache_dir and cache_dir / f"{index.name}-{task}-3d-{grid[0]}x{grid[1]}")

    return SiteSplits(index.name, train=dataset("train"), val=dataset("val"), test=dataset("test"),
                      num_classes=limits.num_classes, skipped=skipped)


def volume_depth_of(config: RunConfig) -> int | None:
    """`load_site`'s volume_depth for the run's model: the run's for a 3D model, None for 2D."""
    return config.volume_depth if model_spec(config.model).spatial_dims == 3 else None


def class_counts(index: SiteIndex) -> dict[str, dict[str, int]]:
    """Labeled images per split and class, as the site check reports them."""
    return {split: dict(sorted(Counter(str(x.label) for x in index.in_split(split)).items()))
            for split in SPLITS}



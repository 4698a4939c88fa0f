"""Synthesize a CT federation: per hospital, chest CT series (one per study) with a study-level
label (a lesion in a lung or the liver, or none), from that hospital's CT vendor and protocol.

Each series is written as CT Image Storage files, one per slice, or (at vendors with an
`enhanced_share`) as one multi-frame Enhanced CT object; labels.csv is keyed by
StudyInstanceUID and SeriesInstanceUID; masks, when asked, as `.npy` volumes in the
assembled-volume order (rows, columns, slices along the slice normal) and/or as DICOM SEG objects
referencing the series. Everything derives from the seed.
"""

import csv
import hashlib
import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fedhealth.core.crypto.wire import LABELS_FILE
from fedhealth.core.synth.ct_dicom import SeriesIds, enhanced_dataset, save, segmentation, slice_datasets
from fedhealth.core.synth.ct_phantom import draw_anatomy, render_hu, scanner_grid, stored_values
from fedhealth.core.synth.ct_vendors import CTVendor, ct_vendor_for_site
from fedhealth.core.synth.dicom import ImageIds
from fedhealth.core.synth.federation import MASKS_DIR

#: Lesion radii (mm), large enough to be seen at the small default grid (about 11 mm pixels).
LESION_MM = (15.0, 24.0)
#: Share of lesions placed in a lung (the rest in the liver).
LUNG_SHARE = 0.7


@dataclass(frozen=True)
class CTSiteSummary:
    """What synth wrote for one CT hospital: the numbers a site check must find again."""

    name: str
    series: int
    enhanced: int
    slices: int
    patients: int
    labels: dict[int, int]
    manufacturer: str
    model: str
    patient_position: str
    segmentations: int


def synthesize_ct(out: Path, sites: int, seed: int, *, series_per_site: int = 12,
                  image_size: int = 32, prevalence: float = 0.5, npy_masks: bool = False,
                  seg_masks: bool = False, overwrite: bool = False) -> list[CTSiteSummary]:
    """Write `out/hospital-<k>/` for k = 1..sites; see the module docstring.

    An existing, non-empty hospital folder is refused, or replaced whole with `overwrite`.
    """
    if not 16 <= image_size <= 256:
        raise ValueError(f"CT image_size must be between 16 and 256, got {image_size}")
    if series_per_site < 1 or sites < 1:
        raise ValueError(f"need at least one site and one series a site, got {sites} sites "
                         f"and {series_per_site} series")
    width = len(str(sites))
    summaries = []
    for k in range(sites):
        site_dir = out / f"hospital-{k + 1:0{width}d}"
        if site_dir.exists() and any(site_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{site_dir} is not empty: choose another output folder, "
                                      "or overwrite it (--overwrite)")
            shutil.rmtree(site_dir)
        summaries.append(_write_site(site_dir, k, seed, ct_vendor_for_site(k), series_per_site,
                                     image_size, prevalence, npy_masks, seg_masks))
    return summaries


def _write_site(site_dir: Path, index: int, seed: int, vendor: CTVendor, n_series: int,
                size: int, prevalence: float, npy_masks: bool, seg_masks: bool) -> CTSiteSummary:
    rng = np.random.default_rng([seed, index])
    name = site_dir.name
    finding = np.zeros(n_series, dtype=bool)
    finding[: round(prevalence * n_series)] = True
    rng.shuffle(finding)
    enhanced = rng.random(n_series) < vendor.enhanced_share
    grid = scanner_grid(vendor, size)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(seed), name, *map(str, parts)])

    rows: list[dict[str, str]] = []
    patients, study, slices = 0, 0, 0
    while study < n_series:
        patient_id = f"H{index + 1}CT{patients:04d}"
        folder = hashlib.sha1(f"{seed}/{patient_id}".encode()).hexdigest()[:10]
        birth = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 60 * 365)))
        sex = str(rng.choice(["F", "M"]))
        for _ in range(min(int(rng.choice([1, 1, 2])), n_series - study)):
            day = date(2020, 1, 1) + timedelta(days=int(rng.integers(0, 4 * 365)))
            ids = SeriesIds(
                study=ImageIds(patient_id, f"SYNTH^{patient_id}", birth.strftime("%Y%m%d"), sex,
                               uid("study", study), "", "", day.strftime("%Y%m%d"),
                               f"CT{index + 1}{study:07d}", name),
                series_uid=uid("series", study), frame_of_reference_uid=uid("frame", study),
                sop_uids=tuple(uid("slice", study, k) for k in range(grid.slices)),
                series_number=study + 1)
            anatomy = draw_anatomy(np.random.default_rng([seed, index, study, 1]),
                                   float(rng.uniform(*LESION_MM)) if finding[study] else None,
                                   "lung" if rng.random() < LUNG_SHARE else "liver")
            hu, mask = render_hu(anatomy, grid, vendor)
            datasets = slice_datasets(stored_values(hu, vendor), grid, vendor, ids)
            series_dir = site_dir / "export" / folder / ids.study.study_date / f"S{ids.series_number}"
            if enhanced[study]:
                sources = [enhanced_dataset(datasets, ids, uid("enhanced", study))]
                save(sources[0], series_dir / "ENHANCED")
            else:
                sources = datasets
                for ds in datasets:
                    save(ds, series_dir / f"IM{int(ds.InstanceNumber):04d}")
            slices += grid.slices
            row = {"StudyInstanceUID": ids.study.study_uid, "SeriesInstanceUID": ids.series_uid,
                   "label": str(int(finding[study]))}
            if npy_masks:
                mask_path = site_dir / MASKS_DIR / f"{ids.series_uid}.npy"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                np.save(mask_path, np.ascontiguousarray(mask.transpose(1, 2, 0)))
                row["mask"] = f"{MASKS_DIR}/{mask_path.name}"
            if seg_masks:
                save(segmentation(sources, _in_frame_order(mask, sources, ids), vendor,
                                  uid("seg-series", study),
                                  uid("seg", study)),
                     series_dir.parent / f"SEG{ids.series_number}")
            rows.append(row)
            study += 1
        patients += 1
    with (site_dir / LABELS_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return CTSiteSummary(name, n_series, int(enhanced.sum()), slices, patients,
                         {c: int((finding == c).sum()) for c in (0, 1)}, vendor.manufacturer,
                         vendor.model, vendor.patient_position, n_series if seg_masks else 0)


def _in_frame_order(mask: np.ndarray, sources: list[Dataset], ids: SeriesIds) -> np.ndarray:
    """`mask` (slices in grid order) in the order of the SEG's source frames: the slices
    themselves, or the frames of the Enhanced object, which highdicom orders by its own rule
    (each frame names the slice it was converted from)."""
    if len(sources) > 1:
        return mask
    slice_of = {sop: k for k, sop in enumerate(ids.sop_uids)}
    order = [slice_of[str(frame.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
             for frame in sources[0].PerFrameFunctionalGroupsSequence]
    return mask[order]

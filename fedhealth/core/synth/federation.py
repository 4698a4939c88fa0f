"""Synthesize a federation: one folder of DICOM studies and a labels.csv per hospital.

Non-IID on purpose: a `Scenario` (see `scenarios.py`) fixes each hospital's size, prevalence,
vendor (`vendors.py`) and labelling protocol; the knobs label skew, scanner shift and size skew
build one too. Everything derives from the seed, so two runs
with the same arguments write byte-identical files.
"""

import csv
import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from fedhealth.core.crypto.wire import LABELS_FILE, LABELS_SPLIT_COLUMN, SPLITS
from fedhealth.core.synth.dicom import ImageIds, write_image
from fedhealth.core.synth.phantom import render
from fedhealth.core.synth.scenarios import Scenario, SiteDesign, knob_scenario

MASKS_DIR = "masks"


@dataclass(frozen=True)
class SiteSummary:
    """What synth wrote for one hospital: the numbers a site check must find again."""

    name: str
    images: int
    patients: int
    studies: int
    labels: dict[int, int]
    manufacturer: str
    model: str
    photometric: str
    prevalence: float = field(repr=False)  # share labelled 1


def synthesize_federation(
    out: Path,
    sites: int,
    seed: int,
    *,
    images_per_site: int | Sequence[int] = 48,
    image_size: int = 64,
    label_skew: float = 0.5,
    scanner_shift: float = 1.0,
    segmentation_masks: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[SiteSummary]:
    """Write `out/hospital-<k>/` for k = 1..sites from the generator's knobs; see `synthesize`.

    label_skew in [0, 1]: 0 gives every site 50% prevalence, 1 spreads them from 5% to 95%.
    scanner_shift >= 0: 0 gives every site the same vendor.
    """
    counts = images_per_site if isinstance(images_per_site, int) else tuple(images_per_site)
    scenario = knob_scenario(sites, counts, label_skew, scanner_shift)
    return synthesize(out, scenario, seed, image_size=image_size,
                      segmentation_masks=segmentation_masks, overwrite=overwrite,
                      progress=progress)


def synthesize(out: Path, scenario: Scenario, seed: int, *, image_size: int = 64,
               segmentation_masks: bool = False, overwrite: bool = False,
               progress: Callable[[int], None] | None = None) -> list[SiteSummary]:
    """Write one `out/hospital-<k>/` per site of `scenario` and return what each holds.

    An existing, non-empty hospital folder is refused (stale files from other settings would
    mix in), or replaced whole with `overwrite`. `progress` is called with 1 per image.
    """
    if not 64 <= image_size <= 256:
        raise ValueError(f"image_size must be between 64 and 256, got {image_size}")
    width = len(str(len(scenario.sites)))
    site_dirs = [out / f"hospital-{k + 1:0{width}d}" for k in range(len(scenario.sites))]
    for site_dir in site_dirs:
        if site_dir.exists() and any(site_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{site_dir} is not empty: choose another output folder, "
                                      "or overwrite it (--overwrite)")
            shutil.rmtree(site_dir)
    return [_write_site(site_dir, k, seed, design, image_size, scenario,
                        masks=segmentation_masks, progress=progress)
            for k, (site_dir, design) in enumerate(zip(site_dirs, scenario.sites))]


def _write_site(site_dir: Path, index: int, seed: int, design: SiteDesign, size: int,
                scenario: Scenario, *, masks: bool,
                progress: Callable[[int], None] | None) -> SiteSummary:
    """One hospital: patients with 1-3 single-image studies each, nodules shuffled at the design's
    prevalence and labelled by its protocol; with the scenario's split shares, each patient's
    split written next to its labels."""
    rng = np.random.default_rng([seed, index])
    dealer = np.random.default_rng([seed, index, 1])  # its own stream: images do not depend on it
    name = site_dir.name
    n_images, vendor = design.images, design.vendor
    shows_nodule = np.zeros(n_images, dtype=bool)
    shows_nodule[: round(design.prevalence * n_images)] = True
    rng.shuffle(shows_nodule)
    radii = np.where(shows_nodule, rng.uniform(*scenario.nodule_mm, n_images), 0.0)
    # Contrasts from their own stream: a scenario with one contrast draws the images it always did.
    contrasts = np.random.default_rng([seed, index, 2]).uniform(*scenario.nodule_contrast,
                                                               n_images)
    labels = (shows_nodule & (radii >= design.positive_from_mm)
              & (contrasts < design.positive_below_contrast)).astype(np.int64)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(seed), name, *map(str, parts)])

    rows: list[dict[str, str]] = []
    patients, image = 0, 0
    while image < n_images:
        patient_id = f"H{index + 1}P{patients:05d}"
        folder = hashlib.sha1(f"{seed}/{patient_id}".encode()).hexdigest()[:10]
        birth = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 60 * 365)))
        n_studies = min(int(rng.choice([1, 1, 2, 3])), n_images - image)
        split = (SPLITS[int(dealer.choice(len(SPLITS), p=scenario.split_shares))]
                 if scenario.split_shares else None)
        for study in range(n_studies):
            study_day = date(2020, 1, 1) + timedelta(days=int(rng.integers(0, 4 * 365)))
            ids = ImageIds(
                patient_id=patient_id, patient_name=f"SYNTH^{patient_id}",
                birth_date=birth.strftime("%Y%m%d"), sex=str(rng.choice(["F", "M"])),
                study_uid=uid("study", image), series_uid=uid("series", image),
                sop_uid=uid("image", image), study_date=study_day.strftime("%Y%m%d"),
                accession=f"ACC{index + 1}{image:07d}", institution=name,
            )
            picture = render(rng, size, vendor, float(radii[image]) or None,
                             float(contrasts[image]))
            write_image(site_dir / "export" / folder / ids.study_date / f"IM{study:04d}{vendor.file_suffix}",
                     picture, vendor, ids)
            row = {"StudyInstanceUID": ids.study_uid, "SOPInstanceUID": ids.sop_uid,
                   "label": str(labels[image])}
            if split:
                row[LABELS_SPLIT_COLUMN] = split
            if masks:
                mask_path = site_dir / MASKS_DIR / f"{ids.sop_uid}.npy"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                np.save(mask_path, picture.mask)
                row["mask"] = f"{MASKS_DIR}/{mask_path.name}"
            rows.append(row)
            image += 1
            if progress is not None:
                progress(1)
        patients += 1

    with (site_dir / LABELS_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return SiteSummary(name, n_images, patients, n_images,
                       {c: int((labels == c).sum()) for c in (0, 1)},
                       vendor.manufacturer, vendor.model, vendor.photometric,
                       float(labels.mean()))

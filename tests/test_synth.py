"""fedhealth synth: valid, deterministic DICOM hospitals with the knobs doing what they say."""

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.core.synth import synthesize_federation


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dicoms(site: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(site.rglob("*"))
            if p.is_file() and p.suffix not in (".csv", ".npy")]


def test_same_seed_writes_byte_identical_files(tmp_path: Path) -> None:
    for run in ("a", "b", "c"):
        synthesize_federation(tmp_path / run, 2, seed=3 if run != "c" else 4, images_per_site=6)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_files_are_part10_with_hierarchy_and_vendor_traits(synth_federation: Path) -> None:
    sites = sorted(p for p in synth_federation.iterdir())
    assert [p.name for p in sites] == ["hospital-1", "hospital-2", "hospital-3"]
    seen_photometric, uids = set(), set()
    for site in sites:
        datasets = _dicoms(site)
        assert len(datasets) == 40
        assert len({(ds.Manufacturer, ds.ManufacturerModelName) for ds in datasets}) == 1
        for ds in datasets:
            assert ds.preamble is not None and ds.file_meta.TransferSyntaxUID  # Part 10
            assert ds.SOPClassUID.name in ("Digital X-Ray Image Storage - For Presentation",
                                           "Computed Radiography Image Storage")
            assert ds.Modality in ("DX", "CR") and ds.PixelSpacing and ds.BitsStored
            assert ds.PatientID.startswith(f"H{site.name[-1]}")
            uids.update((ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID))
            seen_photometric.add(ds.PhotometricInterpretation)
            assert ds.pixel_array.max() < 2**ds.BitsStored
    assert len(uids) == 3 * 40 * 3  # every instance, study and series UID unique
    assert seen_photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_no_scanner_shift_means_one_vendor(tmp_path: Path) -> None:
    synthesize_federation(tmp_path, 3, 0, images_per_site=3, scanner_shift=0.0)
    vendors = {(ds.Manufacturer, ds.BitsStored, ds.PhotometricInterpretation)
               for site in tmp_path.iterdir() for ds in _dicoms(site)}
    assert len(vendors) == 1


def test_label_skew_spreads_prevalence_and_sizes_can_differ(tmp_path: Path) -> None:
    summaries = synthesize_federation(tmp_path, 3, 0, images_per_site=[30, 20, 10], label_skew=1.0)
    assert [s.images for s in summaries] == [30, 20, 10]
    prevalence = [s.labels[1] / s.images for s in summaries]
    assert prevalence[0] < 0.15 and prevalence[2] > 0.85
    for s in summaries:
        with (tmp_path / s.name / "labels.csv").open() as f:
            labels = [int(r["label"]) for r in csv.DictReader(f)]
        assert len(labels) == s.images and sum(labels) == s.labels[1]


def test_segmentation_masks_mark_the_finding(tmp_path: Path) -> None:
    synthesize_federation(tmp_path, 1, 0, images_per_site=8, segmentation_masks=True)
    site = tmp_path / "hospital-1"
    with (site / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        mask = np.load(site / row["mask"])
        assert mask.shape == (64, 64)
        assert (mask.sum() > 0) == (row["label"] == "1")


@pytest.mark.parametrize("kwargs", [{"image_size": 32}, {"images_per_site": [5]},
                                    {"label_skew": 2.0}, {"scanner_shift": -1.0}])
def test_bad_knobs_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        synthesize_federation(tmp_path, 2, 0, **kwargs)  # type: ignore[arg-type]


def test_cli_writes_the_federation(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--sites", "2", "--seed",
                                      "5", "--images-per-site", "4,3"])
    assert result.exit_code == 0, result.output
    assert len(_dicoms(tmp_path / "hospital-1")) == 4
    assert len(_dicoms(tmp_path / "hospital-2")) == 3


def test_existing_hospital_folder_is_refused_or_replaced_whole(tmp_path: Path) -> None:
    synthesize_federation(tmp_path, 1, 0, images_per_site=6)
    stale = tmp_path / "hospital-1" / "stale.dcm"
    stale.write_bytes(b"left over from another run")
    with pytest.raises(FileExistsError, match="hospital-1 is not empty"):
        synthesize_federation(tmp_path, 1, 0, images_per_site=4)
    assert stale.exists()  # nothing was touched
    synthesize_federation(tmp_path, 1, 0, images_per_site=4, overwrite=True)
    assert not stale.exists()
    rows = (tmp_path / "hospital-1" / "labels.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4


def test_ct_hospitals_write_hu_series_with_their_vendor_protocol(tmp_path: Path) -> None:
    from fedhealth.core.synth.ct_federation import synthesize_ct
    from fedhealth.core.synth.ct_vendors import CT_VENDORS

    for run in ("a", "b"):
        summaries = synthesize_ct(tmp_path / run, 3, 5, series_per_site=4, image_size=16)
    classic = {k: v for k, v in _digests(tmp_path / "a").items() if "ENHANCED" not in k}
    assert classic == {k: v for k, v in _digests(tmp_path / "b").items() if k in classic}
    for summary, vendor in zip(summaries, CT_VENDORS):
        files = [pydicom.dcmread(p) for p in sorted((tmp_path / "a" / summary.name).rglob("*"))
                 if p.is_file() and p.suffix != ".csv"]
        slices = [ds for ds in files if ds.SOPClassUID.name == "CT Image Storage"]
        enhanced = [ds for ds in files if "Enhanced" in ds.SOPClassUID.name]
        assert len(enhanced) == summary.enhanced and len(slices) + sum(
            int(ds.NumberOfFrames) for ds in enhanced) == summary.slices
        assert {(ds.PatientPosition, ds.ConvolutionKernel, float(ds.SliceThickness))
                for ds in slices} <= {(vendor.patient_position, vendor.kernel,
                                       vendor.slice_thickness_mm)}
        hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in slices]) if slices else np.zeros(1)
        assert slices == [] or (hu.min() < -900 and hu.max() > 30)  # air and tissue, in HU
    assert summaries[2].enhanced > 0 and summaries[1].patient_position == "FFS"
    labels = list(csv.DictReader((tmp_path / "a" / "hospital-1" / "labels.csv").open()))
    assert {"StudyInstanceUID", "SeriesInstanceUID", "label"} <= set(labels[0])

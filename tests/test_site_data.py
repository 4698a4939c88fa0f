"""The site pipeline on real DICOM files: skip reasons, labels join, patient split, transforms, cache."""

import csv
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder

from fedhealth.core.synth.dicom import ImageIds, write_image
from fedhealth.core.synth.phantom import Radiograph
from fedhealth.core.synth.vendors import REFERENCE, VENDORS
from sites import dicom_files
from sites.dataset import SiteDataError, index_site, load_site, site_transforms, split_patients
from sites.dicom_files import Skipped, inspect_file
from sites.pipeline_config import datalist_item


def _ids(n: int, patient: str = "P1") -> ImageIds:
    return ImageIds(patient, f"TEST^{patient}", "19700101", "F", f"1.2.3.{n}.1", f"1.2.3.{n}.2",
                    f"1.2.3.{n}.3", "20240101", f"ACC{n}", "test")


def _gradient(size: int = 16) -> Radiograph:
    ramp = np.linspace(0, 1, size * size).reshape(size, size)
    return Radiograph(ramp, np.zeros((size, size), np.uint8), 1.0)


@pytest.fixture()
def site(tmp_path: Path, synth_federation: Path) -> Path:
    """A writable copy of hospital-2 (MONOCHROME1, CR with rescale intercept)."""
    return Path(shutil.copytree(synth_federation / "hospital-2", tmp_path / "hospital-2"))


def _a_dicom(site: Path) -> Path:
    return next(p for p in sorted(site.rglob("*")) if p.is_file() and "export" in p.parts)


def test_truncated_file_is_skipped_with_reason(site: Path) -> None:
    victim = _a_dicom(site)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 500])
    result = inspect_file(victim)
    assert isinstance(result, Skipped)
    assert "pixel data cannot be decoded" in result.reason

    victim.write_bytes(data[:200])  # cut inside the header
    assert isinstance(inspect_file(victim), Skipped)


def test_non_dicom_and_pixelless_files_are_skipped(site: Path) -> None:
    (site / "notes.txt").write_text("export log\n")
    victim = _a_dicom(site)
    ds = pydicom.dcmread(victim)
    del ds.PixelData
    ds.save_as(victim)
    reasons = {Path(s.path).name: s.reason for s in index_site(site).skipped}
    assert reasons["notes.txt"].startswith("not a DICOM Part 10 file")
    assert reasons[victim.name].startswith("no pixel data")


def test_12_bit_jpeg_without_a_decoder_names_the_optional_extra(tmp_path: Path) -> None:
    """pydicom's 12-bit JPEG Extended file: python-gdcm's build cannot decode it, only the GPL
    pylibjpeg-libjpeg can, which is not installed by default."""
    path = Path(shutil.copy(get_testdata_file("JPEG-lossy.dcm"), tmp_path / "jpeg12.dcm"))
    if "pylibjpeg" in get_decoder(pydicom.uid.JPEGExtended12Bit).available_plugins:
        pytest.skip("the optional GPL decoder is installed here")
    result = inspect_file(path)
    assert isinstance(result, Skipped)
    assert "12-bit samples" in result.reason and "fedhealth[jpeg-gpl]" in result.reason


def test_a_corrupt_jpeg_lossless_file_is_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "jpeg_lossless.dcm"
    write_image(path, _gradient(), REFERENCE, _ids(1))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1  # decoded by python-gdcm
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    result = inspect_file(path)
    assert isinstance(result, Skipped) and "pixel data cannot be decoded" in result.reason


def test_unknown_label_row_and_unlabeled_study_are_reported(site: Path) -> None:
    labels = site / "labels.csv"
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    dropped = rows.pop(0)
    rows.append({"StudyInstanceUID": "1.2.999.1", "SOPInstanceUID": "", "label": "1"})
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["StudyInstanceUID", "SOPInstanceUID", "label"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows)
    index = index_site(site)
    reasons = [s.reason for s in index.skipped]
    assert any(r.startswith("unlabeled study") and dropped["StudyInstanceUID"] in r for r in reasons)
    assert any("1.2.999.1 matches no usable image" in r for r in reasons)
    assert len(index.images) == 39


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    picture = _gradient()
    write_image(tmp_path / "m2.dcm", picture, REFERENCE, _ids(1))
    write_image(tmp_path / "m1.dcm", picture, VENDORS[3], _ids(2))  # MONOCHROME1, 16 bit
    assert pydicom.dcmread(tmp_path / "m1.dcm").PhotometricInterpretation == "MONOCHROME1"
    transform = site_transforms(16)
    out = {name: transform(datalist_item(str(tmp_path / f"{name}.dcm"), 0,
                                         name == "m1"))["image"] for name in ("m1", "m2")}
    torch.testing.assert_close(out["m1"], out["m2"], atol=0.02, rtol=0)
    assert out["m2"][0, -1, -1] > 0.9  # dense stays bright


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    vendor = replace(VENDORS[2], rescale_slope=2.0, rescale_intercept=-1000.0)  # a CR vendor
    write_image(tmp_path / "cr.dcm", _gradient(), vendor, _ids(1))
    stored = pydicom.dcmread(tmp_path / "cr.dcm").pixel_array.astype(np.float32)
    load = site_transforms(16).transforms[0]  # the PydicomReader step, before windowing
    values = np.asarray(load({"image": str(tmp_path / "cr.dcm")})["image"])
    np.testing.assert_allclose(values, stored * 2.0 - 1000.0)


def test_split_keeps_patients_whole_and_is_deterministic(synth_federation: Path) -> None:
    site = synth_federation / "hospital-1"
    index = index_site(site, seed=3)
    patients_by_split = {s: {x.image.patient_id for x in index.in_split(s)}
                         for s in ("train", "val", "test")}
    assert all(patients_by_split.values())
    assert not patients_by_split["train"] & patients_by_split["val"]
    assert not patients_by_split["train"] & patients_by_split["test"]
    assert not patients_by_split["val"] & patients_by_split["test"]
    multi = {p for p in index.split if sum(x.image.patient_id == p for x in index.images) > 1}
    assert multi, "synth should give some patients several studies"
    assert index_site(site, seed=3).split == index.split
    assert index_site(site, seed=4).split != index.split
    splits = load_site(site, seed=3)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [
        len(index.in_split(s)) for s in ("train", "val", "test")]


def test_split_of_three_patients_fills_every_split() -> None:
    assert sorted(split_patients({"a": 0, "b": 1, "c": 0}, seed=0).values()) == [
        "test", "train", "val"]
    shares = list(split_patients({str(i): i % 2 for i in range(100)}, seed=1).values())
    assert [shares.count(s) for s in ("train", "val", "test")] == [60, 20, 20]


def _rewrite_labels(site: Path, split_of: Callable[[int, dict[str, str]], str]) -> None:
    """Give labels.csv a split column: row i gets split_of(i, row)."""
    labels = site / "labels.csv"
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "split"])
        writer.writeheader()
        writer.writerows({**r, "split": split_of(i, r)} for i, r in enumerate(rows))


def test_manifest_split_column_fixes_patients_and_the_rest_are_dealt(site: Path) -> None:
    patients = sorted({x.image.patient_id for x in index_site(site).images})
    held_out = set(patients[: len(patients) // 2])
    by_sop = {x.image.sop_uid: x.image.patient_id for x in index_site(site).images}
    _rewrite_labels(site, lambda _, r: "test" if by_sop[r["SOPInstanceUID"]] in held_out else "")
    for seed in (0, 1):
        index = index_site(site, seed=seed)
        assert all(index.split[p] == "test" for p in held_out)
        dealt = {index.split[p] for p in patients if p not in held_out}
        assert dealt == {"train", "val", "test"}  # the others are still dealt, all three splits


def test_manifest_split_that_splits_a_patient_is_refused(site: Path) -> None:
    by_sop = {x.image.sop_uid: x.image.patient_id for x in index_site(site).images}
    counts: dict[str, int] = {}
    for patient in by_sop.values():
        counts[patient] = counts.get(patient, 0) + 1
    patient = next(p for p, n in counts.items() if n > 1)
    seen: list[str] = []

    def split_of(_: int, row: dict[str, str]) -> str:
        if by_sop[row["SOPInstanceUID"]] != patient:
            return ""
        seen.append(row["SOPInstanceUID"])
        return "train" if len(seen) == 1 else "test"

    _rewrite_labels(site, split_of)
    with pytest.raises(SiteDataError, match=patient):
        index_site(site)


def test_manifest_split_that_is_no_split_skips_its_row(site: Path) -> None:
    _rewrite_labels(site, lambda i, _: "holdout" if i == 0 else "")
    index = index_site(site)
    assert len(index.images) == 39
    assert any("row 2" in s.reason and "holdout" in s.reason for s in index.skipped)


def test_items_are_cached_tensors_so_epochs_never_decode(site: Path) -> None:
    splits = load_site(site, image_size=32)
    assert splits.name == "hospital-2" and splits.num_classes == 2 and not splits.skipped
    shutil.rmtree(site / "export")  # no DICOM left: only the cache can answer
    item = splits.train[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0


def test_persistent_cache_and_segmentation_masks(tmp_path: Path) -> None:
    from fedhealth.core.synth import synthesize_federation

    synthesize_federation(tmp_path / "fed", 1, 0, images_per_site=10, segmentation_masks=True)
    splits = load_site(tmp_path / "fed" / "hospital-1", task="segmentation",
                       cache_dir=tmp_path / "cache")
    items = [splits.train[i] for i in range(len(splits.train))]
    assert all(x["mask"].shape == (1, 64, 64) for x in items)
    assert all(bool(x["mask"].sum() > 0) == bool(x["label"] == 1) for x in items)
    assert list((tmp_path / "cache").rglob("*.pt"))


def test_unusable_site_folders_raise_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="does not exist"):
        load_site(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "labels.csv").write_text("StudyInstanceUID,label\n")
    with pytest.raises(SiteDataError, match="empty"):
        load_site(tmp_path / "empty")
    (tmp_path / "empty" / "scan.txt").write_text("not dicom")
    with pytest.raises(SiteDataError, match=r"empty.*no usable labeled image"):
        load_site(tmp_path / "empty")


def test_a_restarted_site_decodes_only_files_that_changed(
        synth_federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "hospital-1"
    shutil.copytree(synth_federation / "hospital-1", site)
    first = load_site(site, cache_dir=tmp_path / "cache")
    inspected: list[Path] = []
    real_inspect = dicom_files.inspect_file

    def counting(path: Path, *limits: int) -> object:
        inspected.append(path)
        return real_inspect(path, *limits)

    monkeypatch.setattr(dicom_files, "inspect_file", counting)
    again = load_site(site, cache_dir=tmp_path / "cache")
    assert inspected == []  # every inspection was remembered
    assert [len(s) for s in (again.train, again.val, again.test)] == \
        [len(s) for s in (first.train, first.val, first.test)]
    changed = sorted(p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv")[0]
    changed.write_bytes(changed.read_bytes()[:200])  # truncated in place
    third = load_site(site, cache_dir=tmp_path / "cache")
    assert inspected == [changed]
    assert any(s.path == str(changed) for s in third.skipped)


def test_a_file_rewritten_in_place_is_decoded_again(tmp_path: Path) -> None:
    """The disk cache is keyed by each file's size and modification time too: a federation
    synthesized again into the same folder must not train on the old pixels."""
    from fedhealth.core.synth import synthesize_federation

    synthesize_federation(tmp_path / "fed", 1, 0, images_per_site=10)
    site = tmp_path / "fed" / "hospital-1"
    first = load_site(site, cache_dir=tmp_path / "cache")
    path = first.train.data[0]["image"]  # type: ignore[attr-defined]
    before = first.train[0]["image"]
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array.max() - ds.pixel_array).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)
    again = load_site(site, cache_dir=tmp_path / "cache")
    index = [x["image"] for x in again.train.data].index(path)  # type: ignore[attr-defined]
    assert not torch.equal(again.train[index]["image"], before)


def test_a_site_check_spares_training_the_inspections(
        synth_federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sites.dataset import scan_record
    from sites.site_check import check_site

    site, cache = synth_federation / "hospital-1", tmp_path / "cache"
    report = check_site(site, remember=scan_record(cache, site))
    inspected: list[Path] = []
    real_inspect = dicom_files.inspect_file
    monkeypatch.setattr(dicom_files, "inspect_file",
                        lambda path, *limits: inspected.append(path) or real_inspect(path, *limits))
    splits = load_site(site, cache_dir=cache)
    assert inspected == [] and report.images == sum(
        len(s) for s in (splits.train, splits.val, splits.test))

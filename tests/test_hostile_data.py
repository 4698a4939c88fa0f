"""Hostile and broken site data (issue 11), through `fedhealth site check` and `load_site`.

Every case uses real DICOM files: the synthetic generator's, mutated with pydicom, or pydicom's own
test files. Each asserts the outcome: the file or row is skipped with a reason naming it, or the
manifest is refused naming both rows, and the rest of the site still loads.
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from fedhealth.app.cli import app
from sites.data_limits import DataLimits
from sites.dataset import SiteDataError, index_site, load_site
from sites.site_check import check_site

PYDICOM_FILES = Path(get_testdata_file("CT_small.dcm")).parent


@pytest.fixture()
def site(tmp_path: Path, synth_federation: Path) -> Path:
    """A writable copy of hospital-1 (40 images, labels.csv)."""
    return Path(shutil.copytree(synth_federation / "hospital-1", tmp_path / "hospital-1"))


def _images(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*") if p.is_file() and "export" in p.parts)


def _check_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["site", "check", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _reasons(report: dict) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in report["skipped"]}


def _loaded_paths(splits: object) -> set[str]:
    return {item["image"] for split in ("train", "val", "test")
            for item in getattr(splits, split).data}


def _declaring(source: str, target: Path, rows: int, columns: int) -> Path:
    """pydicom's small compressed `source`, its header now declaring rows x columns."""
    ds = pydicom.dcmread(get_testdata_file(source))
    ds.Rows, ds.Columns = rows, columns
    ds.PatientID, ds.StudyInstanceUID = "HOSTILE", "1.2.826.0.1.3680043.99.1"
    ds.save_as(target)
    return target


# ------------------------------------------------------------------ declared size, before decoding
def test_declared_size_over_the_limit_is_refused_before_decoding(site: Path) -> None:
    rle = _declaring("MR_small_RLE.dcm", site / "export" / "rle.dcm", 65535, 65535)
    j2k = _declaring("JPEG2000.dcm", site / "export" / "j2k.dcm", 20000, 20000)
    assert rle.stat().st_size < 10_000 and j2k.stat().st_size < 4_000
    reasons = _reasons(_check_json(str(site)))
    assert "65535 x 65535" in reasons[str(rle)] and "exceeds the site's limit of 200.0 MB" in \
        reasons[str(rle)]
    assert "20000 x 20000" in reasons[str(j2k)] and "800.0 MB" in reasons[str(j2k)]
    splits = load_site(site)
    assert {str(rle), str(j2k)} <= {s.path for s in splits.skipped}
    assert len(_loaded_paths(splits)) == 40


# Address space capped at what the imports took + 2 GB, so a regression fails instead of
# swapping the shared machine; tracemalloc sees numpy's buffers, ru_maxrss the whole process.
_PEAK_PROBE = """
import os, resource, sys, tracemalloc
from pathlib import Path
from sites.dicom_files import inspect_file
mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 1024**3, resource.RLIM_INFINITY))
tracemalloc.start()
result = inspect_file(Path(sys.argv[1]))
# this process's own peak RSS (kB): ru_maxrss would keep the forking parent's across exec
high_water = next(line for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmHWM:"))
print(tracemalloc.get_traced_memory()[1], high_water.split()[1], result.reason)
"""


def test_peak_memory_stays_small_on_a_file_declaring_65535_squared(tmp_path: Path) -> None:
    """Before the fix this 7.8 KB file made the RLE decoder allocate 8.6 GB; now it is refused
    from its header. Run in a child process so its peak is its own."""
    crafted = _declaring("MR_small_RLE.dcm", tmp_path / "rle.dcm", 65535, 65535)
    probe = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(crafted)], capture_output=True,
                           text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak, max_rss_kb, reason = probe.stdout.strip().split(" ", 2)
    assert reason.startswith("declared image size 65535 x 65535")
    assert int(peak) < 20 * 10**6  # bytes allocated while inspecting: the pixels never decoded
    assert int(max_rss_kb) < 1024**2  # the whole process, torch and MONAI included: < 1 GB


def test_the_limit_is_a_site_check_option_and_a_site_setting(site: Path) -> None:
    victim = _images(site)[0]  # 64 x 64 x 16 bit = 8192 bytes declared
    small = _check_json(str(site), "--max-image-mb", "0.008")
    assert "= 0.00819 MB exceeds the site's limit of 0.008 MB" in _reasons(small)[str(victim)]
    assert small["images"] == 0
    assert _check_json(str(site), "--max-image-mb", "0.0082")["images"] == 40
    with pytest.raises(SiteDataError, match="no usable labeled image"):
        load_site(site, limits=DataLimits(max_image_mb=0.008))


def test_frames_count_in_the_declared_size_before_decoding(tmp_path: Path) -> None:
    """A 2-frame RGB file claiming 100000 frames is refused from its header (100000 x 100 x 100
    x 3 samples = 3 GB), not decoded; under the limit, frames it does not hold fail the decode."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_2frame.dcm"))
    ds.NumberOfFrames = 100000
    ds.save_as(tmp_path / "many.dcm")
    ds.NumberOfFrames = 3
    ds.save_as(tmp_path / "three.dcm")
    reasons = _reasons(_check_json(str(tmp_path)))
    assert reasons[str(tmp_path / "many.dcm")].startswith(
        "declared image size 100 x 100 x 100000 frames x 3 samples x 8 bits = 3,000.0 MB")
    assert reasons[str(tmp_path / "three.dcm")].startswith("pixel data cannot be decoded")


def test_a_palette_without_its_colour_table_is_skipped_by_both(site: Path) -> None:
    victim = site / "export" / "palette.dcm"
    ds = pydicom.dcmread(get_testdata_file("OBXXXX1A.dcm"))
    ds.PatientID, ds.StudyInstanceUID = "HOSTILE", "1.2.826.0.1.3680043.99.3"
    del ds.RedPaletteColorLookupTableData
    ds.save_as(victim)
    reason = _reasons(_check_json(str(site)))[str(victim)]
    assert reason.startswith("PALETTE COLOR image whose colour table cannot be applied")
    assert str(victim) not in _loaded_paths(load_site(site))


@pytest.mark.parametrize(("photometric", "samples", "problem"), [
    ("CMYK", 4, "PhotometricInterpretation CMYK: the site reads"),
    ("RGB", 1, "RGB with SamplesPerPixel 1: RGB has 3"),
    ("YBR_ICT", 3, "YBR_ICT in Explicit VR Little Endian: that colour transform exists only"),
])
def test_colour_models_the_site_cannot_convert_are_named(tmp_path: Path, photometric: str,
                                                         samples: int, problem: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples
    ds.save_as(tmp_path / "colour.dcm")
    assert _reasons(_check_json(str(tmp_path)))[str(tmp_path / "colour.dcm")].startswith(problem)


# ------------------------------------------------------------------ values and shapes after decoding
@pytest.mark.parametrize("slope", ["NaN", "inf", "-inf"])
def test_non_finite_rescale_skips_the_file_naming_it(site: Path, slope: str) -> None:
    victim = _images(site)[3]
    ds = pydicom.dcmread(victim)
    ds.RescaleSlope = slope
    ds.save_as(victim)
    reason = _reasons(_check_json(str(site)))[str(victim)]
    assert reason.startswith("non-finite pixel values after rescale") and slope in reason
    splits = load_site(site)
    assert str(victim) not in _loaded_paths(splits) and len(_loaded_paths(splits)) == 39
    for split in (splits.train, splits.val, splits.test):
        assert all(bool(np.isfinite(np.asarray(x["image"])).all()) for x in split)


def test_columns_1_over_a_64_column_image_is_skipped_by_both(site: Path) -> None:
    victim = _images(site)[0]
    ds = pydicom.dcmread(victim)
    ds.Columns = 1
    ds.save_as(victim)
    reason = _reasons(_check_json(str(site)))[str(victim)]
    assert "the header declares 64 x 1" in reason
    assert len(_loaded_paths(load_site(site))) == 39  # crashed in MONAI's Resized before


def test_whatever_site_check_accepts_load_site_loads(tmp_path: Path) -> None:
    """pydicom's whole test corpus plus a genuinely 1-column image, all labeled: every image the
    check accepts decodes into a finite training tensor, and nothing else is loaded."""
    site = Path(shutil.copytree(PYDICOM_FILES, tmp_path / "corpus"))
    ds = pydicom.dcmread(site / "CT_small.dcm")
    ds.PixelData = ds.pixel_array[:, :1].copy().tobytes()
    ds.Columns, ds.SOPInstanceUID = 1, "1.2.826.0.1.3680043.99.2"
    ds.save_as(site / "one_column.dcm")
    accepted = check_site(site)
    studies = sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in
                      {str(p) for p in site.rglob("*") if p.is_file()} -
                      {s["path"] for s in accepted.skipped}})
    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,label\n" + "".join(f"{uid},{i % 2}\n"
                                                           for i, uid in enumerate(studies)))
    splits = load_site(site, labels=labels, image_size=16)
    items = [item for split in ("train", "val", "test") for item in getattr(splits, split).data]
    assert len(items) == accepted.images > 20  # a multi-frame file: one item per frame
    assert len(_loaded_paths(splits)) == accepted.files - len(accepted.skipped)
    assert str(site / "one_column.dcm") in _loaded_paths(splits)
    for split in (splits.train, splits.val, splits.test):
        for item in split:
            assert item["image"].shape == (1, 16, 16) and bool(item["image"].isfinite().all())


# ------------------------------------------------------------------ the manifest
def _rewrite_labels(site: Path, edit: Callable[[list[dict[str, str]]], list[dict[str, str]]]
                    ) -> list[dict[str, str]]:
    path = site / "labels.csv"
    with path.open() as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    rows = edit(rows)
    fields += [k for k in rows[0] if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.mark.parametrize("label", ["1_0", "\u0663", "1e20", "2", "-1", "+1", "99999999999999999999"])
def test_labels_must_be_plain_ascii_integers_in_the_class_range(site: Path, label: str) -> None:
    rows = _rewrite_labels(site, lambda rows: [{**rows[0], "label": label}, *rows[1:]])
    study = rows[0]["StudyInstanceUID"]
    report = check_site(site)
    row_reasons = [s["reason"] for s in report.skipped if s["path"] == str(site / "labels.csv")]
    assert any(r.startswith("row 2: label") and "plain integers 0 to 1" in r for r in row_reasons)
    assert any(study in s["reason"] and s["reason"].startswith("unlabeled study")
               for s in report.skipped)
    index = index_site(site)
    assert study not in {x.image.study_uid for x in index.images}
    assert {x.label for x in index.images} <= {0, 1}
    assert len(_loaded_paths(load_site(site))) == len(index.images) < 40


def test_a_third_class_is_accepted_when_declared(site: Path) -> None:
    _rewrite_labels(site, lambda rows: [{**rows[0], "label": "2"}, *rows[1:]])
    report = check_site(site, limits=DataLimits(num_classes=3))
    assert not report.skipped and "2" in str(report.labels)
    assert load_site(site, limits=DataLimits(num_classes=3)).num_classes == 3


def test_conflicting_duplicate_keys_are_an_error_naming_both_rows(site: Path) -> None:
    def duplicate(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        flipped = {**rows[4], "label": str(1 - int(rows[4]["label"]))}
        return [*rows, dict(rows[2]), flipped]  # an exact repeat is harmless, a conflict is not

    rows = _rewrite_labels(site, duplicate)
    repeat, conflict = len(rows), len(rows) + 1  # their line numbers (line 1 is the header)
    result = CliRunner().invoke(app, ["site", "check", str(site)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert f"rows 6 and {conflict} both give SOPInstanceUID {rows[4]['SOPInstanceUID']}" in text
    with pytest.raises(SiteDataError, match=f"rows 6 and {conflict} both give"):
        load_site(site)
    _rewrite_labels(site, lambda rows: rows[:-1])  # the conflict removed, the repeat stays
    report = check_site(site)
    assert [s["reason"] for s in report.skipped] == [f"row {repeat}: repeats row 4 (ignored)"]
    assert report.images == 40


@pytest.fixture()
def seg_site(tmp_path: Path) -> Path:
    from fedhealth.core.synth import synthesize_federation

    synthesize_federation(tmp_path / "fed", 1, 0, images_per_site=10, segmentation_masks=True)
    return tmp_path / "fed" / "hospital-1"


def test_mask_paths_must_stay_inside_the_site_folder(seg_site: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((64, 64), np.uint8))
    link = seg_site / "masks" / "link.npy"
    link.symlink_to(outside)
    escape = "../" * 16 + "etc/passwd"  # deeper than any tmp folder: resolves to /etc/passwd
    _rewrite_labels(seg_site, lambda rows: [{**rows[0], "mask": escape},
                                            {**rows[1], "mask": "masks/link.npy"}, *rows[2:]])
    reasons = [s["reason"] for s in check_site(seg_site).skipped]
    assert any(r.startswith(f"row 2: mask path '{escape}' resolves to /etc/passwd, outside the "
                            "site folder") for r in reasons)
    assert any(r.startswith("row 3: mask path 'masks/link.npy' resolves to " + str(outside))
               for r in reasons)
    splits = load_site(seg_site, task="segmentation")
    assert len(_loaded_paths(splits)) == 8


@pytest.mark.parametrize("mask, problem", [
    (np.zeros((3, 3), np.uint8), "shape (3, 3), the image is 64 x 64 (Rows x Columns)"),
    (np.full((64, 64), np.nan, np.float32), "values other than 0 and 1 (nan)"),
    (np.full((64, 64), 7, np.uint8), "values other than 0 and 1 (7)"),
])
def test_masks_must_fit_their_image_and_be_binary(seg_site: Path, mask: np.ndarray,
                                                  problem: str) -> None:
    rows = _rewrite_labels(seg_site, lambda rows: rows)
    victim = seg_site / rows[0]["mask"]
    np.save(victim, mask)
    skipped = {s["path"]: s["reason"] for s in check_site(seg_site).skipped}
    image = next(p for p, r in skipped.items() if str(victim) in r)
    assert problem in skipped[image]
    splits = load_site(seg_site, task="segmentation")
    assert image not in _loaded_paths(splits) and len(_loaded_paths(splits)) == 9
    for split in (splits.train, splits.val, splits.test):
        assert all(set(np.unique(np.asarray(x["mask"]))) <= {0.0, 1.0} for x in split)


# ------------------------------------------------------------------ every directory entry
def test_every_directory_entry_is_used_or_listed(site: Path, tmp_path: Path) -> None:
    export = site / "export"
    (export / "dangling.dcm").symlink_to(site / "gone.dcm")
    (export / "loop-a").symlink_to(export / "loop-b")
    (export / "loop-b").symlink_to(export / "loop-a")
    outside = tmp_path / "outside.dcm"
    shutil.copy(_images(site)[0], outside)
    (export / "outside.dcm").symlink_to(outside)
    (export / "inside.dcm").symlink_to(_images(site)[1])
    (tmp_path / "outside-folder").mkdir()
    (export / "outside-folder").symlink_to(tmp_path / "outside-folder")
    os.mkfifo(export / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(export / "sock"))
    try:
        report = _check_json(str(site))
    finally:
        sock.close()
    reasons = _reasons(report)
    assert reasons[str(export / "dangling.dcm")].startswith("dangling symbolic link")
    assert reasons[str(export / "loop-a")].startswith("symbolic link that cannot be resolved")
    assert reasons[str(export / "outside.dcm")].startswith(f"symbolic link to {outside}, outside")
    assert reasons[str(export / "outside-folder")].startswith("symbolic link to")
    assert "inside the site folder" in reasons[str(export / "inside.dcm")]
    assert reasons[str(export / "pipe")] == "a FIFO (named pipe), not a file"
    assert reasons[str(export / "sock")] == "a socket, not a file"
    entries = sum(len(files) + len([d for d in dirs if (Path(root) / d).is_symlink()])
                  for root, dirs, files in os.walk(site))
    assert report["files"] == entries - 1 == report["images"] + len(report["skipped"])  # - labels
    assert report["images"] == 40


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 folder and file anyway; "
                                              "the sub-case needs an unprivileged user")
def test_unreadable_folders_and_files_are_listed(site: Path) -> None:
    folder, victim = _images(site)[0].parent, _images(site)[-1]
    victim.chmod(0)
    folder.chmod(0)
    try:
        reasons = _reasons(_check_json(str(site)))
    finally:
        folder.chmod(0o755)
        victim.chmod(0o644)
    assert reasons[str(folder)].startswith("folder cannot be read (PermissionError")
    assert reasons[str(victim)].startswith("cannot be read (PermissionError")


def test_decoding_on_many_threads_leaves_pydicoms_validation_setting_alone() -> None:
    # A CacheDataset decodes on a thread pool; MONAI's metadata step switches pydicom's
    # process-wide reading validation to RAISE and back, which threads could leave at RAISE.
    from concurrent.futures import ThreadPoolExecutor

    from pydicom import config

    from sites.dicom_files import SiteDicomReader

    before = config.settings.reading_validation_mode
    reader = SiteDicomReader()
    datasets = [reader.read(get_testdata_file("CT_small.dcm")) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ds: [reader.get_data(ds) for _ in range(40)], datasets))
    assert config.settings.reading_validation_mode == before

"""fedhealth site check: counts equal what synth wrote; pydicom's own corpus is fully accounted for."""

import json
import os
from pathlib import Path

import pydicom.data
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.core.synth import synthesize_federation
from sites.site_check import check_site

FIELDS = {"site", "path", "labels_file", "files", "images", "patients", "studies", "modalities",
          "manufacturers", "labels", "skipped", "series", "volumes", "segmentations",
          "series_skipped"}
PYDICOM_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


def _check_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["site", "check", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_counts_match_what_synth_wrote(tmp_path: Path) -> None:
    summaries = synthesize_federation(tmp_path, 3, 7, images_per_site=[14, 10, 8])
    for summary in summaries:
        report = _check_json(str(tmp_path / summary.name))
        assert set(report) == FIELDS
        assert report["skipped"] == []
        assert (report["images"], report["patients"], report["studies"]) == (
            summary.images, summary.patients, summary.studies)
        assert report["manufacturers"] == {summary.manufacturer: summary.images}
        per_class = {c: sum(split.get(str(c), 0) for split in report["labels"].values())
                     for c in (0, 1)}
        assert per_class == summary.labels
        assert set(report["labels"]) == {"train", "val", "test"}
        assert (report["volumes"], report["series"]) == (0, summary.studies)  # a 2D site


def test_a_synthetic_ct_federation_passes_with_one_volume_per_series(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--modality", "CT",
                                      "--series-per-site", "3", "--image-size", "16",
                                      "--seg-masks"])
    assert result.exit_code == 0, result.output
    for site in sorted(tmp_path.iterdir()):
        report = _check_json(str(site))
        assert report["skipped"] == [] and report["series_skipped"] == []
        assert report["volumes"] == report["series"] == report["studies"] == 3
        assert report["segmentations"] == 3  # every SEG is its series' mask
        assert report["files"] == len([p for p in site.rglob("*") if p.is_file()]) - 1  # labels


def test_pydicom_corpus_is_fully_accounted_for() -> None:
    report = _check_json(str(PYDICOM_FILES))
    files = [p for p in PYDICOM_FILES.rglob("*") if p.is_file()]
    assert report["files"] == len(files) > 100
    assert report["images"] >= len(files) - len(report["skipped"])  # multi-frame: an image a frame
    assert report["images"] > 20 and report["labels"] == {} and report["labels_file"] is None
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert all(reasons.values())
    assert reasons["MR_truncated.dcm"].startswith("pixel data cannot be decoded")
    assert reasons["rtplan.dcm"].startswith("no pixel data")
    assert reasons["README.txt"].startswith("not a DICOM")
    assert "SC_rgb_jpeg_gdcm.dcm" not in reasons  # colour JPEG Lossless: python-gdcm decodes it
    loaded = set(files) - {Path(s["path"]) for s in report["skipped"]}
    assert {p.name for p in loaded} >= {"CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                        "MR_small_jpeg_ls_lossless.dcm"}


def test_human_output_and_errors(synth_federation: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["site", "check", str(synth_federation / "hospital-1")])
    assert result.exit_code == 0 and "hospital-1" in result.output and "site check" in result.output
    missing = runner.invoke(app, ["site", "check", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_labels_option_points_elsewhere(synth_federation: Path, tmp_path: Path) -> None:
    site = synth_federation / "hospital-3"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text((site / "labels.csv").read_text())
    report = check_site(site, labels=manifest)
    assert report.labels_file == str(manifest)
    # labels.csv in the site folder is now just another file, and not DICOM
    assert [s["reason"][:17] for s in report.skipped] == ["not a DICOM Part "]
    assert report.images == 40

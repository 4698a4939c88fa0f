"""Real DICOM files nobody here made: pydicom's test corpus, pydicom-data's and pynetdicom's.

Colour (YBR, palette, RGB), multi-frame and JPEG Lossless files go through the site reader and the
site pipeline (`sites.pipeline_config`) and come out as pydicom itself decodes them; the corpus
folders are accounted for file by file (usable + skipped == files), and no file is skipped for
being colour, multi-frame or lacking a decoder, except 12-bit JPEG (no permissive decoder).
"""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, ScaleIntensityRangePercentilesd
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

from sites.dataset import index_site, load_site, site_transforms
from sites.dicom_files import SiteDicomReader, list_site
from sites.pipeline_config import (
    BUNDLE_READER,
    FRAME,
    IMAGE,
    LUMA,
    NO_FRAME,
    PALETTE,
    datalist_item,
    folder_datalist,
    pipeline_steps,
)
from sites.site_check import check_site

PYDICOM_FILES = Path(get_testdata_file("CT_small.dcm")).parent
PYDICOM_DATA = Path(get_testdata_file("JPEG-LL.dcm")).parent  # pydicom-data (test extra)


def _site(tmp_path: Path, *names: str) -> Path:
    """A site folder holding copies of pydicom's (or pydicom-data's) files `names`."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(get_testdata_file(name), site / name)
    return site


def _before_windowing(in_channels: int, reader: dict[str, object] | None = None) -> Compose:
    """The site pipeline up to its channel step: pixels as decoded, frame taken, channels made."""
    steps = pipeline_steps(16, reader or {"_target_": "sites.dicom_files.SiteDicomReader"},
                           in_channels=in_channels)
    parsed = Compose(ConfigParser({"steps": steps}).get_parsed_content("steps"))
    window = next(i for i, t in enumerate(parsed.transforms)
                  if isinstance(t, ScaleIntensityRangePercentilesd))
    return Compose(parsed.transforms[:window])


def _channels(path: Path, in_channels: int, frame: int = NO_FRAME) -> np.ndarray:
    item = datalist_item(str(path), 0, False, frame)
    return np.asarray(_before_windowing(in_channels)(item)[IMAGE])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float32) * np.array(LUMA, dtype=np.float32)).sum(-1)


# ------------------------------------------------------------------ colour
@pytest.mark.parametrize("name", ["SC_ybr_full_uncompressed.dcm",
                                  "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_dcmtk_+eb+cy+np.dcm"])  # YBR_FULL_422 in JPEG baseline
def test_ybr_becomes_pydicoms_rgb_then_bt601_luma(tmp_path: Path, name: str) -> None:
    path = _site(tmp_path, name) / name
    stored = pixel_array(path, as_rgb=False)  # the YBR values as stored
    rgb = convert_color_space(stored, "YBR_FULL", "RGB")  # pydicom's conversion, both YBR_FULLs
    np.testing.assert_array_equal(_channels(path, 3), np.moveaxis(rgb, -1, 0))
    np.testing.assert_allclose(_channels(path, 1)[0], _luma(rgb), rtol=1e-6)
    assert not np.array_equal(stored, rgb)  # the conversion did something


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm"])  # 8- and 16-bit LUTs
def test_palette_colour_is_looked_up_by_site_and_bundle_alike(tmp_path: Path, name: str) -> None:
    path = _site(tmp_path, name) / name
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)
    assert rgb.shape == (ds.Rows, ds.Columns, 3) and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 2
    site = _channels(path, 3)
    np.testing.assert_array_equal(site, np.moveaxis(rgb, -1, 0))
    # plain PydicomReader (the bundle's) returns indices; the data list's flag looks them up
    bundle = _before_windowing(3, BUNDLE_READER)({**datalist_item(str(path), 0, False),
                                                  PALETTE: True})[IMAGE]
    np.testing.assert_array_equal(np.asarray(bundle), site)
    np.testing.assert_allclose(_channels(path, 1)[0], _luma(rgb), rtol=1e-6)


def test_rgb_with_three_channels_is_pydicoms_rgb_and_grey_is_repeated(tmp_path: Path) -> None:
    site = _site(tmp_path, "SC_rgb.dcm", "CT_small.dcm")
    rgb = pydicom.dcmread(site / "SC_rgb.dcm").pixel_array
    np.testing.assert_array_equal(_channels(site / "SC_rgb.dcm", 3), np.moveaxis(rgb, -1, 0))
    grey = _channels(site / "CT_small.dcm", 3)
    assert grey.shape[0] == 3 and np.array_equal(grey[0], grey[2])
    out = site_transforms(16, in_channels=3)(datalist_item(str(site / "SC_rgb.dcm"), 1, False))
    assert out[IMAGE].shape == (3, 16, 16) and out[IMAGE].dtype == torch.float32
    one = site_transforms(16)(datalist_item(str(site / "SC_rgb.dcm"), 1, False))[IMAGE]
    assert one.shape == (1, 16, 16)


def test_in_channels_other_than_1_or_3_is_refused() -> None:
    with pytest.raises(ValueError, match="in_channels must be one of"):
        pipeline_steps(16, BUNDLE_READER, in_channels=4)


# ------------------------------------------------------------------ JPEG Lossless
def test_jpeg_lossless_decodes_equal_to_its_uncompressed_twin(tmp_path: Path) -> None:
    """pydicom's SC_rgb_jpeg_gdcm.dcm is SC_rgb.dcm in JPEG Lossless SV1 (python-gdcm decodes)."""
    site = _site(tmp_path, "SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", "JPEG-LL.dcm")
    lossless, twin = site / "SC_rgb_jpeg_gdcm.dcm", site / "SC_rgb.dcm"
    assert pydicom.dcmread(lossless).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    reader = SiteDicomReader()
    decoded, _ = reader.get_data(reader.read(lossless))
    np.testing.assert_array_equal(decoded, pydicom.dcmread(twin).pixel_array)
    np.testing.assert_array_equal(_channels(lossless, 3), _channels(twin, 3))
    ct = site / "JPEG-LL.dcm"  # 16-bit greyscale CT, Process 14 SV1
    values = _channels(ct, 1)
    assert values.shape == (1, 1024, 256) and np.isfinite(values).all() and values.std() > 0
    assert {Path(x.image.path).name for x in index_site(site, require_labels=False).images} == {
        "SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", "JPEG-LL.dcm"}


# ------------------------------------------------------------------ multi-frame, frame-wise
def test_a_multi_frame_file_gives_one_item_per_frame_with_its_files_label(tmp_path: Path) -> None:
    site = _site(tmp_path, "SC_rgb_2frame.dcm", "OBXXXX1A_2frame.dcm", "CT_small.dcm")
    studies = {n: pydicom.dcmread(site / n, stop_before_pixels=True).StudyInstanceUID
               for n in ("SC_rgb_2frame.dcm", "OBXXXX1A_2frame.dcm", "CT_small.dcm")}
    assert len(set(studies.values())) == 3
    (site / "labels.csv").write_text("StudyInstanceUID,label\n" + "".join(
        f"{uid},{i % 2}\n" for i, uid in enumerate(studies.values())))
    index = index_site(site)
    frames = sorted((Path(x.image.path).name, x.image.frame, x.label) for x in index.images)
    assert frames == [("CT_small.dcm", NO_FRAME, 0), ("OBXXXX1A_2frame.dcm", 0, 1),
                      ("OBXXXX1A_2frame.dcm", 1, 1), ("SC_rgb_2frame.dcm", 0, 0),
                      ("SC_rgb_2frame.dcm", 1, 0)]
    report = check_site(site)
    assert (report.images, report.files) == (5, 3)  # frames are images; labels.csv is no file
    all_frames = pydicom.dcmread(site / "SC_rgb_2frame.dcm").pixel_array
    assert not np.array_equal(all_frames[0], all_frames[1])
    for frame in (0, 1):
        np.testing.assert_array_equal(_channels(site / "SC_rgb_2frame.dcm", 3, frame),
                                      np.moveaxis(all_frames[frame], -1, 0))
    splits = load_site(site, image_size=16)
    items = [i for s in (splits.train, splits.val, splits.test) for i in s.data]
    assert sorted((Path(i[IMAGE]).name, i[FRAME]) for i in items) == [
        (n, f) for n, f, _ in frames]
    for split in (splits.train, splits.val, splits.test):  # a file's frames share one split
        names = {Path(i[IMAGE]).name for i in split.data}
        assert all(n in names for n, _, _ in frames if n in names)
        assert all(x[IMAGE].shape == (1, 16, 16) for x in split)


def test_a_multi_frame_file_is_decoded_once_for_all_its_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _site(tmp_path, "SC_rgb_rle_2frame.dcm") / "SC_rgb_rle_2frame.dcm"
    reader = SiteDicomReader()
    decodes = []
    real = pydicom.Dataset.convert_pixel_data

    def counting(self: pydicom.Dataset, *args: object, **kwargs: object) -> None:
        decodes.append(1)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom.Dataset, "convert_pixel_data", counting)
    first = reader.get_data(reader.read(path))[0]
    once = len(decodes)
    assert once >= 1 and first.shape == (2, 100, 100, 3)
    for _ in range(3):  # the items of its other frames, read as LoadImage reads (a 1-tuple)
        assert reader.get_data(reader.read((str(path),)))[0] is first
    assert len(decodes) == once
    path.touch()  # a rewritten file is decoded again
    reader.get_data(reader.read(path))
    assert len(decodes) == 2 * once
    transform = site_transforms(16)  # the training pipeline's reader, over its frame items
    frames = [transform(datalist_item(str(path), 0, False, f))[IMAGE] for f in (0, 1, 0)]
    assert len(decodes) == 3 * once and not torch.equal(frames[0], frames[1])


def test_the_bundles_data_list_gives_the_site_pipelines_pixels(tmp_path: Path) -> None:
    """An exported bundle's data list (every file, a multi-frame one an item per frame, palette
    flags from the header) through plain PydicomReader gives what the site reader gives."""
    site = _site(tmp_path, "SC_rgb_2frame.dcm", "OBXXXX1A.dcm", "CT_small.dcm")
    parser = ConfigParser({"dataset_dir": str(site), "datalist": folder_datalist("@dataset_dir")},
                          globals={"pathlib": "pathlib", "pydicom": "pydicom"})
    items = parser.get_parsed_content("datalist")
    assert [(Path(i[IMAGE]).name, i[FRAME], i[PALETTE]) for i in items] == [
        ("CT_small.dcm", NO_FRAME, False), ("OBXXXX1A.dcm", NO_FRAME, True),
        ("SC_rgb_2frame.dcm", 0, False), ("SC_rgb_2frame.dcm", 1, False)]
    for in_channels in (1, 3):
        bundle, at_site = _before_windowing(in_channels, BUNDLE_READER), _before_windowing(
            in_channels)
        for item in items:
            np.testing.assert_array_equal(np.asarray(bundle(item)[IMAGE]), np.asarray(at_site(
                {**item, PALETTE: False})[IMAGE]))


# ------------------------------------------------------------------ whole corpora
def _corpora() -> list[Path]:
    folders = [PYDICOM_FILES, PYDICOM_FILES.parent / "charset_files", PYDICOM_DATA]
    pynetdicom = pytest.importorskip("pynetdicom")
    return [*folders, Path(pynetdicom.__file__).parent / "tests" / "dicom_files"]


# Reasons a corpus file may still be skipped for: it is no image, cannot be tied to a patient,
# is damaged, or is 12-bit JPEG (no permissive decoder). Never colour, frames or a missing decoder.
_ACCEPTED_REASONS = ("not a DICOM Part 10 file", "no pixel data", "DICOMDIR", "a DICOM SEG",
                     "an RT Dose grid", "no PatientID", "no StudyInstanceUID",
                     "pixel data cannot be decoded",
                     "pixel data in JPEG Extended (Process 2 and 4) with 12-bit samples")
# Damaged on purpose in pydicom's corpus (truncated, corrupt J2K codestream) or 12-bit JPEG.
_UNDECODABLE = {"MR_truncated.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
                "emri_small_jpeg_2k_lossless_too_short.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm"}


# Skipped before colour, frames and python-gdcm: RGB, YBR_FULL_422 (JPEG baseline, native), YBR_RCT,
# 8- and 16-bit palettes, a 120-frame US cine, Enhanced CT, JPEG Lossless CT, RGB and 12-bit.
_NOW_LOADED = {"SC_rgb.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
               "US1_J2KR.dcm", "OBXXXX1A_2frame.dcm", "gdcm-US-ALOKA-16.dcm",
               "color3d_jpeg_baseline.dcm", "eCT_Supplemental.dcm", "JPEG-LL.dcm",
               "SC_rgb_jpeg_gdcm.dcm", "bad_sequence.dcm"}


def test_every_corpus_file_is_accounted_for_and_every_decodable_one_loads() -> None:
    loaded: set[str] = set()
    for folder in _corpora():
        index = index_site(folder, require_labels=False)
        on_disk = list_site(folder)
        usable = {x.image.path for x in index.images}
        loaded |= {path.name for path in usable}
        assert len(usable) + len(index.skipped) == len(on_disk.files) + len(on_disk.skipped)
        for skipped in index.skipped:
            assert skipped.reason.startswith(_ACCEPTED_REASONS), skipped
            name = Path(skipped.path).name
            if skipped.reason.startswith(("no PatientID", "no StudyInstanceUID")) and (
                    "Rows" in pydicom.dcmread(skipped.path, stop_before_pixels=True)):
                reader = SiteDicomReader()  # decodable: only its identity is missing
                assert np.isfinite(reader.get_data(reader.read(skipped.path))[0]).all(), name
            elif skipped.reason.startswith(("pixel data cannot", "pixel data in JPEG")):
                assert name in _UNDECODABLE, skipped
    assert loaded >= _NOW_LOADED, _NOW_LOADED - loaded

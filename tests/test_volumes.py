"""Series -> volumes on real DICOM files: slice order from positions, broken series skipped with
a reason naming them, head-first and feet-first alike after orientation, Enhanced multi-frame
objects and DICOM SEG masks aligned to their series."""

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fedhealth.core.synth.ct_dicom import (
    SeriesIds,
    enhanced_dataset,
    save,
    segmentation,
    slice_datasets,
)
from fedhealth.core.synth.ct_phantom import SliceGrid, draw_anatomy, render_hu, scanner_grid, stored_values
from fedhealth.core.synth.ct_vendors import CT_VENDORS, CTVendor
from fedhealth.core.synth.dicom import ImageIds
from sites.dataset import index_site, load_site
from sites.dicom_files import scan_tree
from sites.seg_masks import seg_mask
from sites.series_volume import SeriesVolumeReader, Volume, find_volumes
from sites.volume_pipeline import volume_transforms

SIZE = 16
# Head-first, numbered from the head down (InstanceNumber runs against the normal), 12 slices.
CRANIAL = replace(CT_VENDORS[0], slice_thickness_mm=10.0, numbering="cranial")


@dataclass(frozen=True)
class Written:
    grid: SliceGrid
    stored: np.ndarray  # (slices, rows, columns), grid order = ascending along the normal
    mask: np.ndarray
    ids: SeriesIds
    datasets: list[pydicom.Dataset]
    vendor: CTVendor

    def hu(self) -> np.ndarray:
        """What the volume must hold: (rows, columns, slices) in Hounsfield units."""
        values = self.stored * self.vendor.rescale_slope + self.vendor.rescale_intercept
        return values.transpose(1, 2, 0)


def _series(vendor: CTVendor = CRANIAL, seed: int = 0, lesion_mm: float | None = 30.0) -> Written:
    grid = scanner_grid(vendor, SIZE)
    anatomy = draw_anatomy(np.random.default_rng(seed), lesion_mm)
    hu, mask = render_hu(anatomy, grid, vendor)
    study = ImageIds(f"P{seed}", f"TEST^P{seed}", "19500101", "F", generate_uid(), "", "",
                     "20240101", f"ACC{seed}", "test")
    ids = SeriesIds(study, generate_uid(), generate_uid(),
                    tuple(generate_uid() for _ in range(grid.slices)), 1)
    stored = stored_values(hu, vendor)
    return Written(grid, stored, mask, ids, slice_datasets(stored, grid, vendor, ids), vendor)


def _write(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    """Each dataset under a random name (no suffix), in nested folders: names say nothing."""
    paths = []
    for ds in datasets:
        name = uuid.uuid4().hex
        path = folder / name[:2] / name
        save(ds, path)
        paths.append(path)
    return paths


def _volumes(folder: Path) -> tuple[list[Volume], list[str]]:
    scan = scan_tree(folder)
    found = find_volumes(scan.images, scan.skipped)
    return found.volumes, [s.reason for s in found.problems]


def _pixels(volume: Volume) -> np.ndarray:
    reader = SeriesVolumeReader()
    array, _ = reader.get_data(reader.read(volume.files))
    return array


@pytest.mark.parametrize("order", ["reverse", "random", "by InstanceNumber"])
def test_slices_are_ordered_by_position_whatever_the_file_order(tmp_path: Path, order: str) -> None:
    series = _series()
    rng = np.random.default_rng(1)
    given = {"reverse": series.datasets[::-1],
             "random": [series.datasets[i] for i in rng.permutation(len(series.datasets))],
             "by InstanceNumber": sorted(series.datasets, key=lambda d: int(d.InstanceNumber))}
    _write(given[order], tmp_path)
    (volume,), problems = _volumes(tmp_path)
    assert problems == []
    along = [float(np.dot(f.position, series.grid.normal)) for f in volume.frames]
    assert along == sorted(along) and len(along) == series.grid.slices
    np.testing.assert_array_equal(_pixels(volume), series.hu())
    # InstanceNumber runs against the normal here: sorting by it would have flipped the volume
    numbers = [int(pydicom.dcmread(f.path, stop_before_pixels=True).InstanceNumber)
               for f in volume.frames]
    assert numbers == sorted(numbers, reverse=True)


def _problem(tmp_path: Path, change: Callable[[list[pydicom.Dataset]], list[pydicom.Dataset]]
             ) -> str:
    series = _series()
    _write(change(series.datasets), tmp_path)
    volumes, problems = _volumes(tmp_path)
    assert volumes == [] and len(problems) == 1
    assert series.ids.series_uid in problems[0]  # the reason names the series
    return problems[0]


def test_a_missing_slice_skips_the_series_naming_the_gap(tmp_path: Path) -> None:
    reason = _problem(tmp_path, lambda ds: ds[:5] + ds[6:])
    assert "missing slice" in reason and "1 slice missing" in reason and "20.00 mm" in reason


def test_two_orientations_in_one_series_are_refused(tmp_path: Path) -> None:
    def tilt(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
        for ds in datasets[::2]:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
        return datasets

    assert "2 orientations in one series" in _problem(tmp_path, tilt)


def test_uneven_spacing_mixed_pixel_spacing_and_sizes_are_refused(tmp_path: Path) -> None:
    def shift(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
        x, y, z = datasets[4].ImagePositionPatient
        datasets[4].ImagePositionPatient = [x, y, z + 3.0]
        return datasets

    def spacing(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
        datasets[3].PixelSpacing = [0.5, 0.5]
        return datasets

    def size(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
        small = datasets[2]
        small.PixelData = np.zeros((8, 8), np.uint16).tobytes()
        small.Rows = small.Columns = 8
        return datasets

    assert "inconsistent slice spacing" in _problem(tmp_path / "a", shift)
    assert "mixed pixel spacings" in _problem(tmp_path / "b", spacing)
    assert "mixed slice sizes 8 x 8, 16 x 16" in _problem(tmp_path / "c", size)


def test_head_first_and_feet_first_give_the_same_oriented_volume(tmp_path: Path) -> None:
    clean = replace(CRANIAL, noise_hu=0.0, blur_mm=0.0, sharpen=0.0)  # same pixels both ways
    head_first, feet_first = (_series(replace(clean, patient_position=p), seed=7)
                              for p in ("HFS", "FFS"))
    volumes = {}
    for name, series in (("HFS", head_first), ("FFS", feet_first)):
        _write(series.datasets, tmp_path / name)
        (volumes[name],), _ = _volumes(tmp_path / name)
    raw = {name: _pixels(v) for name, v in volumes.items()}
    assert not np.allclose(raw["HFS"], raw["FFS"])  # stored flipped left-right and end over end
    transform = volume_transforms(SIZE, 12)
    out = {name: transform({"image": v.files, "label": 0, "modality": "CT"})["image"]
           for name, v in volumes.items()}
    np.testing.assert_allclose(out["HFS"].numpy(), out["FFS"].numpy(), atol=1e-5)


def test_an_enhanced_ct_is_the_same_volume_as_its_slices(tmp_path: Path) -> None:
    series = _series(replace(CRANIAL, rescale_slope=0.5, rescale_intercept=-1000.0))
    _write(series.datasets, tmp_path / "classic")
    save(enhanced_dataset(series.datasets, series.ids, generate_uid()), tmp_path / "enh" / "obj")
    (classic,), _ = _volumes(tmp_path / "classic")
    (enhanced,), problems = _volumes(tmp_path / "enh")
    assert problems == [] and enhanced.enhanced and not classic.enhanced
    assert enhanced.shape == classic.shape
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-6)
    np.testing.assert_array_equal(_pixels(enhanced), _pixels(classic))
    np.testing.assert_array_equal(_pixels(enhanced), series.hu())  # per-frame rescale applied


@pytest.mark.parametrize("enhanced", [False, True])
def test_a_seg_mask_is_aligned_to_its_series(tmp_path: Path, enhanced: bool) -> None:
    series = _series(seed=3)
    assert series.mask.any()
    if enhanced:
        source = enhanced_dataset(series.datasets, series.ids, generate_uid())
        save(source, tmp_path / "enh")
        # the object's frames follow highdicom's order: the SEG is written in that order
        slice_of = {sop: k for k, sop in enumerate(series.ids.sop_uids)}
        order = [slice_of[str(f.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
                 for f in source.PerFrameFunctionalGroupsSequence]
        sources, mask = [source], series.mask[order]
    else:
        rng = np.random.default_rng(2)
        _write([series.datasets[i] for i in rng.permutation(len(series.datasets))], tmp_path)
        sources, mask = series.datasets, series.mask
    save(segmentation(sources, mask, series.vendor, generate_uid(), generate_uid()),
         tmp_path / "seg")
    (volume,), _ = _volumes(tmp_path)
    np.testing.assert_array_equal(seg_mask(tmp_path / "seg", volume), series.mask.transpose(1, 2, 0))
    index = index_site(tmp_path, require_labels=False)
    assert [x.mask for x in index.volumes] == [tmp_path / "seg"]  # found by the series it names
    assert all(s.path != str(tmp_path / "seg") for s in index.skipped)  # used, not skipped


def test_a_seg_of_another_series_is_refused(tmp_path: Path) -> None:
    series, other = _series(seed=1), _series(seed=2)
    _write(series.datasets, tmp_path)
    save(segmentation(other.datasets, other.mask, other.vendor, generate_uid(), generate_uid()),
         tmp_path / "seg")
    (volume,), _ = _volumes(tmp_path)
    with pytest.raises(ValueError, match=f"references no instance of series {series.ids.series_uid}"):
        seg_mask(tmp_path / "seg", volume)


def test_a_3d_site_trains_on_labeled_volumes_with_masks_from_npy_or_seg(tmp_path: Path) -> None:
    rows = ["StudyInstanceUID,SeriesInstanceUID,label,mask"]
    for seed in range(5):
        series = _series(seed=seed, lesion_mm=30.0 if seed % 2 else None)
        folder = tmp_path / f"s{seed}"
        _write(series.datasets, folder)
        if seed < 3:
            np.save(tmp_path / f"m{seed}.npy", series.mask.transpose(1, 2, 0))
            mask = f"m{seed}.npy"
        else:
            save(segmentation(series.datasets, series.mask, series.vendor, generate_uid(),
                              generate_uid()), folder / "seg")
            mask = ""
        rows.append(f"{series.ids.study.study_uid},{series.ids.series_uid},{seed % 2},{mask}")
    np.save(tmp_path / "bad.npy", np.zeros((SIZE, SIZE, 3), np.uint8))
    extra = _series(seed=9)
    _write(extra.datasets, tmp_path / "s9")
    rows.append(f",{extra.ids.series_uid},1,bad.npy")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    splits = load_site(tmp_path, image_size=16, volume_depth=32, task="segmentation")
    items = [splits.train[i] for i in range(len(splits.train))]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 5
    assert all(x["image"].shape == (1, 16, 16, 32) and x["mask"].shape == (1, 16, 16, 32)
               for x in items)
    assert any(x["mask"].sum() > 0 for x in items)
    bad = [s.reason for s in splits.skipped if extra.ids.series_uid in s.reason]
    assert len(bad) == 1 and "shape (16, 16, 3), the volume is 16 x 16 x 12" in bad[0]


def test_shuffled_names_and_folders_give_voxel_identical_volumes(tmp_path: Path) -> None:
    from fedhealth.core.synth.ct_federation import synthesize_ct

    synthesize_ct(tmp_path / "orig", 3, 0, series_per_site=2, image_size=16)
    rng = np.random.default_rng(0)
    for site in sorted((tmp_path / "orig").iterdir()):
        files = sorted(p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv")
        for i in rng.permutation(len(files)):
            target = tmp_path / "shuffled" / site.name / f"d{rng.integers(3)}" / f"{uuid.uuid4().hex}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(files[i], target)
        original, _ = _volumes(site)
        shuffled, problems = _volumes(tmp_path / "shuffled" / site.name)
        assert problems == [] and len(original) == len(shuffled) == 2
        by_series = {v.series_uid: v for v in shuffled}
        for volume in original:
            np.testing.assert_array_equal(_pixels(volume), _pixels(by_series[volume.series_uid]))


def test_a_nifti_mask_is_placed_by_its_affine_not_its_array_order(tmp_path: Path) -> None:
    import nibabel as nib

    from sites.labels import mask_problem
    from sites.nifti_masks import nifti_mask

    series = _series(seed=3)
    _write(series.datasets, tmp_path / "s")
    (volume,), _ = _volumes(tmp_path / "s")
    expected = series.mask.transpose(1, 2, 0)
    affine = np.asarray(volume.affine)
    # as a converter might write it: slices first and the rows flipped, the affine saying so
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, expected.shape[0] - 1
    reordered = np.flip(expected, 0).transpose(2, 0, 1)
    moved = (affine @ flip)[:, [2, 0, 1, 3]]
    nib.save(nib.Nifti1Image(reordered.astype(np.uint8), moved), tmp_path / "m.nii.gz")
    assert not np.array_equal(reordered.transpose(1, 2, 0), expected)  # array order alone is wrong
    np.testing.assert_array_equal(nifti_mask(tmp_path / "m.nii.gz", volume), expected)
    assert mask_problem(tmp_path / "m.nii.gz", volume) is None
    shifted = moved.copy()
    shifted[2, 3] += 7.0  # most of a slice off the series' grid
    nib.save(nib.Nifti1Image(reordered.astype(np.uint8), shifted), tmp_path / "off.nii.gz")
    assert "does not lie on the grid of series" in mask_problem(tmp_path / "off.nii.gz", volume)

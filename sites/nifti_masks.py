"""NIfTI masks of volumes (what dcm2niix, 3D Slicer or ITK-SNAP users hand over), put on the
volume's grid by their affines, not by their array order.

A NIfTI file's voxel axes may be the DICOM volume's in any order and direction (converters
reorient); its affine says where each voxel is, in RAS as the volume's (`Volume.affine`) is. The
mask is reoriented onto the volume's axes (nibabel's orientation transforms), and must then have
the volume's shape and lie on its grid (same corner and spacing within half a voxel): anything
else would need resampling, which a label map must not silently get.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from sites.seg_masks import MaskProblem
from sites.series_volume import Volume

SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def nifti_mask(path: Path, volume: Volume) -> np.ndarray:
    """The NIfTI mask on `volume`'s grid: uint8 (rows, columns, slices), values 0 and 1."""
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise MaskProblem(f"{path} is not a NIfTI image ({type(image).__name__})")
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except MaskProblem:
        raise
    except Exception as err:  # nibabel raises several types for a damaged or foreign file
        raise MaskProblem(f"NIfTI {path} cannot be read ({type(err).__name__}: {err})") from None
    if data.ndim != 3:
        raise MaskProblem(f"NIfTI {path} has {data.ndim} dimensions; a volume mask has 3")
    target = np.asarray(volume.affine)
    transform = ornt_transform(io_orientation(affine), io_orientation(target))
    mask = apply_orientation(data, transform)
    moved = affine @ inv_ornt_aff(transform, data.shape)
    if mask.shape != volume.shape:
        raise MaskProblem(f"NIfTI {path} is {mask.shape} on the volume's axes, the volume "
                          f"(series {volume.series_uid}) is {volume.shape}")
    spacing = np.abs(np.linalg.norm(target[:3, :3], axis=0))
    if not (np.abs(moved[:3, :3] - target[:3, :3]).max() < spacing.min() / 2
            and np.abs(moved[:3, 3] - target[:3, 3]).max() < spacing.min() / 2):
        raise MaskProblem(f"NIfTI {path} does not lie on the grid of series "
                          f"{volume.series_uid} (its affine differs beyond half a voxel): "
                          "export the mask from this series")
    values = np.unique(mask)
    if not np.isin(values, (0, 1)).all():
        raise MaskProblem(f"NIfTI {path} holds values other than 0 and 1: masks are binary")
    return mask.astype(np.uint8)

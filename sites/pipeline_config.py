"""The site pipeline's steps, written once, as MONAI bundle-config dicts.

`sites.dataset.site_transforms` instantiates them (monai.bundle.ConfigParser) for training,
evaluation and `site predict`; `sites.bundle_layout` writes the same dicts into an exported
bundle's `configs/inference.json`. So the preprocessing a department runs with `python -m
monai.bundle run` is, step for step, the one the site trained and scored with, and it names
only MONAI and torch: no fedhealth module. Only the DICOM reader differs, and only in what it
refuses: the site's (`sites.dicom_files.SiteDicomReader`) is MONAI's PydicomReader that first
rejects files over the site's size limit or with unusable pixel data; a bundle on new studies
reads with plain PydicomReader, in the same orientation, so the same pixels come out.

Kept free of torch and MONAI imports: `sites.bundle_layout` loads with the CLI.
"""

# The data list's keys: the DICOM file, its label (-1: unknown) and whether it is stored
# dark-is-dense (PhotometricInterpretation MONOCHROME1), which the pipeline inverts.
IMAGE, LABEL, MASK, MONOCHROME1 = "image", "label", "mask", "monochrome1"

# PydicomReader's `swap_ij`, the site's and a bundle's alike: rows stay rows.
SWAP_IJ = False
# How a bundle run reads new studies: MONAI's PydicomReader (which applies RescaleSlope and
# RescaleIntercept) with the site reader's options.
BUNDLE_READER: dict[str, object] = {"_target_": "monai.data.PydicomReader", "swap_ij": SWAP_IJ}


def site_reader(max_image_bytes: int) -> dict[str, object]:
    """The site's reader: PydicomReader that refuses files over its size limit before decoding."""
    return {"_target_": "sites.dicom_files.SiteDicomReader", "max_image_bytes": max_image_bytes}


def pipeline_steps(image_size: int, reader: dict[str, object],
                   masks: bool = False) -> list[dict[str, object]]:
    """DICOM file -> normalised tensor: read with rescale slope/intercept, channel first, window
    the 0.5-99.5 percentiles to [0, 1], invert MONOCHROME1, resize (area), float32.

    reader: the config of the DICOM reader (`site_reader(...)` or `BUNDLE_READER`); masks: also
    load, resize (nearest) and keep the training masks (`mask`: a NumPy file per image).
    Deterministic, hence cacheable.
    """
    spatial = [IMAGE, MASK] if masks else [IMAGE]
    load_masks = [{"_target_": "monai.transforms.LoadImaged", "keys": MASK,
                   "reader": "NumpyReader", "image_only": True}] if masks else []
    return [
        {"_target_": "monai.transforms.LoadImaged", "keys": IMAGE, "reader": reader,
         "image_only": True},
        *load_masks,
        {"_target_": "monai.transforms.EnsureChannelFirstd", "keys": spatial,
         "channel_dim": "no_channel"},
        {"_target_": "monai.transforms.ScaleIntensityRangePercentilesd", "keys": IMAGE,
         "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},
        # MONOCHROME1 to MONOCHROME2's sense: the flag is the data list's, the values in [0, 1]
        {"_target_": "monai.transforms.Lambda",
         "func": f"$lambda d: {{**d, '{IMAGE}': 1.0 - d['{IMAGE}']}} if d['{MONOCHROME1}'] "
                 "else d"},
        {"_target_": "monai.transforms.Resized", "keys": spatial,
         "spatial_size": [image_size, image_size], "mode": ["area", "nearest"][: len(spatial)]},
        {"_target_": "monai.transforms.EnsureTyped", "keys": spatial, "dtype": "$torch.float32",
         "track_meta": False},
        {"_target_": "monai.transforms.EnsureTyped", "keys": LABEL, "dtype": "$torch.int64",
         "track_meta": False},
        {"_target_": "monai.transforms.SelectItemsd", "keys": [*spatial, LABEL]},
    ]


# The bundle-config imports `folder_datalist`'s expression uses (`import pydicom` loads pydicom.misc)
DATALIST_IMPORTS = ("$import pathlib", "$import pydicom")


def folder_datalist(folder: str) -> str:
    """A bundle-config `$` expression: the data list of every DICOM file under the config
    entry `folder` (a reference such as `@dataset_dir`), in the order `fedhealth site check`
    scans (depth first, names sorted), each with its MONOCHROME1 flag read by pydicom; the
    config must also hold DATALIST_IMPORTS."""
    return (f"$[{{'{IMAGE}': str(p), '{LABEL}': -1, '{MONOCHROME1}': pydicom.dcmread(p, "
            "stop_before_pixels=True).get('PhotometricInterpretation') == 'MONOCHROME1'} "
            f"for p in sorted(pathlib.Path({folder}).rglob('*')) "
            "if p.is_file() and not p.is_symlink() and pydicom.misc.is_dicom(p)]")

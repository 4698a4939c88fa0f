"""The site pipeline's steps, written once, as MONAI bundle-config dicts.

`sites.dataset.site_transforms` instantiates them (monai.bundle.ConfigParser) for training,
evaluation and `site predict`; `sites.bundle_layout` writes the same dicts into an exported
bundle's `configs/inference.json`. So the preprocessing a department runs with `python -m
monai.bundle run` is, step for step, the one the site trained and scored with, and it names
only MONAI and torch: no fedhealth module. Only the DICOM reader differs, and only in what it
refuses: the site's (`sites.dicom_files.SiteDicomReader`) is MONAI's PydicomReader that first
rejects files over the site's size limit or with unusable pixel data; a bundle on new studies
reads with plain PydicomReader, in the same orientation, so the same pixels come out. (PALETTE
COLOR is the one difference in what the readers return: the site's looks the colour table up,
plain PydicomReader returns the indices; the data list's `palette` flag tells the pipeline to
look them up, so both give the same RGB.)

Colour and frames: a reader returns (frames,) rows, columns (, 3) as pydicom lays pixels out, YBR
already as RGB. The pipeline takes the item's frame, then gives the model `in_channels`: a
one-channel model sees luminance, ITU-R BT.601 luma (LUMA) of the RGB values, and greyscale
stays as it is; a three-channel model sees RGB, and greyscale repeated on all three channels.

Kept free of torch and MONAI imports: `sites.bundle_layout` loads with the CLI.
"""

from fedhealth.core.config import IN_CHANNELS

# The data list's keys: the DICOM file, its label (-1: unknown), whether it is stored
# dark-is-dense (PhotometricInterpretation MONOCHROME1), which the pipeline inverts, the frame of a
# multi-frame file the item is (NO_FRAME: a single-frame file, whose pixels have no frames axis),
# and whether the reader returned PALETTE COLOR indices the pipeline must look up.
IMAGE, LABEL, MASK, MONOCHROME1, FRAME, PALETTE = (
    "image", "label", "mask", "monochrome1", "frame", "palette")
NO_FRAME = -1
# ITU-R BT.601 luma weights of R, G, B: what a one-channel model sees of a colour image (the
# weights JPEG's YCbCr, DICOM's YBR_FULL, and PIL's convert("L") use).
LUMA = (0.299, 0.587, 0.114)
# PydicomReader's `swap_ij`, the site's and a bundle's alike: rows stay rows.
SWAP_IJ = False
# How a bundle run reads new studies: MONAI's PydicomReader (which applies RescaleSlope and
# RescaleIntercept) with the site reader's options.
BUNDLE_READER: dict[str, object] = {"_target_": "monai.data.PydicomReader", "swap_ij": SWAP_IJ}


_SITE_READER = "sites.dicom_files.SiteDicomReader"


def site_reader(max_image_bytes: int) -> dict[str, object]:
    """The site's reader: PydicomReader that refuses files over its size limit before decoding."""
    return {"_target_": _SITE_READER, "max_image_bytes": max_image_bytes}


def datalist_item(image: str, label: int, monochrome1: bool, frame: int = NO_FRAME,
                  mask: str | None = None) -> dict[str, object]:
    """One data list entry of the site's reader (which looks palettes up itself)."""
    item: dict[str, object] = {IMAGE: image, LABEL: label, MONOCHROME1: monochrome1,
                               FRAME: frame, PALETTE: False}
    return item if mask is None else {**item, MASK: mask}


def pipeline_steps(image_size: int, reader: dict[str, object], masks: bool = False,
                   in_channels: int = 1) -> list[dict[str, object]]:
    """DICOM file -> normalised tensor: read with rescale slope/intercept, look a palette up, take
    the item's frame, channel first, `in_channels` (luma or RGB, see the module), window the
    0.5-99.5 percentiles of all channels together to [0, 1] (colour keeps its balance), invert
    MONOCHROME1, resize (area), float32.

    reader: the config of the DICOM reader (`site_reader(...)` or `BUNDLE_READER`); masks: also
    load, resize (nearest) and keep the training masks (`mask`: a NumPy file per image).
    Deterministic, hence cacheable.
    """
    if in_channels not in IN_CHANNELS:
        raise ValueError(f"in_channels must be one of {IN_CHANNELS} (greyscale/luminance or RGB), "
                         f"got {in_channels!r}")
    spatial = [IMAGE, MASK] if masks else [IMAGE]
    load_masks: list[dict[str, object]] = [
        {"_target_": "monai.transforms.LoadImaged", "keys": MASK, "reader": "NumpyReader",
         "image_only": True},
        {"_target_": "monai.transforms.EnsureChannelFirstd", "keys": MASK,
         "channel_dim": "no_channel"}] if masks else []
    image = f"d['{IMAGE}']"
    # The site's reader returns native byte order and keeps a multi-frame file's decode: its pixels
    # load as decoded, so no frame's item converts the whole file (float32 comes with the channel
    # step, one frame at a time). Plain PydicomReader may return big-endian arrays, which torch
    # cannot hold: they load as float32 (the same values).
    dtype = None if reader["_target_"] == _SITE_READER else "$numpy.float32"
    return [
        {"_target_": "monai.transforms.LoadImaged", "keys": IMAGE, "reader": reader,
         "image_only": True, "dtype": dtype},
        *load_masks,
        # PALETTE COLOR indices (plain PydicomReader) -> RGB with the file's own colour table
        {"_target_": "monai.transforms.Lambda",
         "func": f"$lambda d: {{**d, '{IMAGE}': torch.as_tensor((lambda pydicom: pydicom.pixels."
                 f"apply_color_lut({image}.numpy().astype('int64'), pydicom.dcmread({image}.meta["
                 "'filename_or_obj'])))(__import__('pydicom.pixels')), dtype=torch.float32)} "
                 f"if d['{PALETTE}'] else d"},
        # a multi-frame file's item: its frame (a copy: the reader keeps the file's pixels)
        {"_target_": "monai.transforms.Lambda",
         "func": f"$lambda d: {{**d, '{IMAGE}': {image}[d['{FRAME}']].clone()}} "
                 f"if d['{FRAME}'] != {NO_FRAME} else d"},
        # rows x columns (x 3) -> 1 or 3 channels first: colour's channel axis is the last
        {"_target_": "monai.transforms.Lambda",
         "func": f"$lambda d: {{**d, '{IMAGE}': ({_channels(in_channels, image)}).float()}}"},
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


def _channels(in_channels: int, image: str) -> str:
    """The expression giving `image` (rows x columns, or rows x columns x 3 RGB, any dtype) as
    `in_channels` x rows x columns."""
    colour = f"{image}.movedim(-1, 0)"
    grey = f"{image}[None]"
    if in_channels == 1:
        colour = f"({colour} * torch.tensor({list(LUMA)}).view(3, 1, 1)).sum(0, keepdim=True)"
    else:
        grey = f"{grey}.expand(3, -1, -1).clone()"
    return f"{colour} if {image}.ndim == 3 else {grey}"


# The bundle-config imports `folder_datalist`'s expression uses (`import pydicom` loads pydicom.misc)
DATALIST_IMPORTS = ("$import pathlib", "$import pydicom")


def folder_datalist(folder: str) -> str:
    """A bundle-config `$` expression: the data list of every DICOM file under the config
    entry `folder` (a reference such as `@dataset_dir`), in the order `fedhealth site check`
    scans (depth first, names sorted), one item per frame of a multi-frame file, each with its
    MONOCHROME1 and PALETTE COLOR flags read by pydicom; the config must also hold
    DATALIST_IMPORTS."""
    photometric = "h.get('PhotometricInterpretation')"
    frames = "int(h.get('NumberOfFrames') or 1)"
    return (f"$[{{'{IMAGE}': str(p), '{LABEL}': -1, '{MONOCHROME1}': {photometric} == "
            f"'MONOCHROME1', '{FRAME}': f, '{PALETTE}': {photometric} == 'PALETTE COLOR'}} "
            f"for p in sorted(pathlib.Path({folder}).rglob('*')) "
            "if p.is_file() and not p.is_symlink() and pydicom.misc.is_dicom(p) "
            "for h in [pydicom.dcmread(p, stop_before_pixels=True)] "
            f"for f in (range({frames}) if {frames} > 1 else [{NO_FRAME}])]")

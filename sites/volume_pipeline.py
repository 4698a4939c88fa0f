"""A volume (one series, or one Enhanced object) -> the tensor a 3D model trains on, with MONAI.

Read (`SeriesVolumeReader`: slices ordered along the normal, rescaled to stored units such as
HU), orient to RAS (`Orientation`: head-first and feet-first scans of one patient come out the
same way round), window (`ScaleIntensityRange` over a fixed HU window for CT, so a given tissue
keeps its value across vendors; the 0.5-99.5 percentiles for MR, which has no absolute unit),
resize to the run's (image_size, image_size, volume_depth) grid, float32. The mask, a `.npy`
volume, a NIfTI file or a DICOM SEG, is put on the image's grid first, so it takes exactly the same spatial
steps (nearest-neighbour). Deterministic, hence cacheable (MONAI CacheDataset/PersistentDataset).
"""

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SelectItemsd,
)

from sites.data_limits import DataLimits
from sites.labels import LabeledVolume
from sites.nifti_masks import is_nifti, nifti_mask
from sites.pipeline_config import IMAGE, LABEL, MASK
from sites.seg_masks import seg_mask
from sites.series_volume import SeriesVolumeReader, load_volume_plan

# The data list's key for a volume's modality, which picks its intensity window.
MODALITY = "modality"
# CT's window in Hounsfield units: air to dense bone, lungs and soft tissue both resolved.
CT_WINDOW_HU = (-1000.0, 1000.0)
AXCODES = "RAS"


class LoadVolumeMaskd(MapTransform):
    """The item's mask (a `.npy` volume, a NIfTI file or a DICOM SEG) on the grid of its volume (planned from
    the item's image files, as the image reader plans it): a MetaTensor with the volume's affine,
    so orientation and resizing treat mask and image alike."""

    def __init__(self, key: str = MASK, image_key: str = IMAGE) -> None:
        super().__init__([key])
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        item = dict(data)
        volume = load_volume_plan(item[self.image_key])  # type: ignore[arg-type]
        for key in self.key_iterator(item):
            path = Path(str(item[key]))
            mask = (np.load(path, allow_pickle=False) if path.suffix == ".npy"
                    else nifti_mask(path, volume) if is_nifti(path) else seg_mask(path, volume))
            item[key] = MetaTensor(np.asarray(mask, dtype=np.float32),
                                   affine=torch.as_tensor(volume.affine),
                                   meta={"original_channel_dim": float("nan")})
        return item


class IntensityWindowd(MapTransform):
    """CT: the fixed HU window to [0, 1] (clipped); any other modality: its 0.5-99.5 percentiles."""

    def __init__(self, key: str = IMAGE, modality_key: str = MODALITY) -> None:
        super().__init__([key])
        self.modality_key = modality_key
        self.ct = ScaleIntensityRange(*CT_WINDOW_HU, b_min=0.0, b_max=1.0, clip=True)
        self.other = ScaleIntensityRangePercentiles(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        item = dict(data)
        window = self.ct if item[self.modality_key] == "CT" else self.other
        for key in self.key_iterator(item):
            item[key] = window(item[key])  # type: ignore[arg-type]
        return item


def volume_transforms(image_size: int, volume_depth: int, masks: bool = False,
                      limits: DataLimits = DataLimits()) -> Compose:
    """Data list item {image: the volume's files, label, modality (, mask)} -> {image:
    [1, S, S, D] float32, label: int64 (, mask: [1, S, S, D] float32)}."""
    spatial = [IMAGE, MASK] if masks else [IMAGE]
    return Compose([
        *([LoadVolumeMaskd()] if masks else []),  # first: it plans from the image's files
        LoadImaged(IMAGE, reader=SeriesVolumeReader(limits.max_image_bytes),  # type: ignore[arg-type]
                   image_only=True),  # MONAI takes a reader instance too; its hint says class
        EnsureChannelFirstd(spatial, channel_dim="no_channel"),
        Orientationd(spatial, axcodes=AXCODES, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        IntensityWindowd(),
        Resized(spatial, spatial_size=(image_size, image_size, volume_depth),
                mode=["area", "nearest"][: len(spatial)]),
        EnsureTyped(spatial, dtype=torch.float32, track_meta=False),
        EnsureTyped(LABEL, dtype=torch.int64, track_meta=False),
        SelectItemsd([*spatial, LABEL]),
    ])


def volume_item(x: LabeledVolume, task: str) -> dict[str, object]:
    """The data list item of a labeled volume: its files in order, label, modality (, mask)."""
    item: dict[str, object] = {IMAGE: x.volume.files, LABEL: x.label, MODALITY: x.volume.modality}
    if task == "segmentation":
        item[MASK] = str(x.mask)
    return item

"""A predicted mask as a DICOM Segmentation object referencing the image it was predicted on.

PACS viewers overlay a DICOM SEG on its source series, so that is how a segmentation bundle's
output goes back to the department (highdicom writes it). One BINARY SEG per source image, one
segment per non-background class, at the source's own Rows x Columns.
"""

import importlib.metadata
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from sites.bundle_layout import BundleFacts

SEG_SERIES_NUMBER = 9001  # fedhealth's SEG series in the source study: clear of scanner series


def write_seg(source: Path, mask: np.ndarray, out_dir: Path, facts: BundleFacts) -> Path:
    """Write `out_dir/<SOPInstanceUID of source>.seg.dcm` for `mask` (Rows x Columns of class
    numbers, 0 = background); return its path."""
    image = pydicom.dcmread(source)
    if mask.shape != (int(image.Rows), int(image.Columns)):
        raise ValueError(f"{source}: mask of shape {mask.shape} for an image of "
                         f"{image.Rows} x {image.Columns}")
    version = importlib.metadata.version("fedhealth")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"fedhealth {facts.model} ({facts.policy}, site {facts.site})", version=version,
        family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=c, segment_label=f"class {c}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for c in range(1, facts.num_classes)]
    spacing = image.get("PixelSpacing") or image.get("ImagerPixelSpacing")
    seg = hd.seg.Segmentation(
        source_images=[image], pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedhealth",
        manufacturer_model_name=facts.model, software_versions=version,
        device_serial_number=facts.site, omit_empty_frames=False,
        # a projection image has no frame of reference: say the pixel spacing outright
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in spacing],
                                                slice_thickness=1.0) if spacing else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{image.SOPInstanceUID}.seg.dcm"
    seg.save_as(path)
    return path

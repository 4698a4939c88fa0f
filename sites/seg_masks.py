"""DICOM SEG objects as masks of the volumes they annotate, the way hospitals store annotations.

A SEG in the site folder names the series it segments (ReferencedSeriesSequence); its frames
are matched to the volume's slices by the referenced SOP instances (classic series) or the
referenced frame numbers (an Enhanced object), through highdicom, never by frame order. So a SEG
that references none of the volume's instances is refused with the reason, not read as an
empty mask (highdicom fills instances a SEG does not cover with zeros, as it must: a SEG leaves
out frames without a segment).
"""

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import SegmentationStorage

from sites.dicom_files import Skipped
from sites.series_volume import Volume


class MaskProblem(ValueError):
    """A SEG that cannot be this volume's mask; the message says why."""


def segmentations_by_series(skipped: Sequence[Skipped]) -> dict[str, list[str]]:
    """SEG files among the entries the 2D scan skipped, by the SeriesInstanceUID they reference."""
    found: dict[str, list[str]] = defaultdict(list)
    for entry in skipped:
        if not os.path.isfile(entry.path) or os.path.islink(entry.path):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
                if ds.get("SOPClassUID") != SegmentationStorage:
                    continue
                referenced = [str(item.get("SeriesInstanceUID", ""))
                              for item in ds.get("ReferencedSeriesSequence", [])]
            except Exception:  # not DICOM, or a malformed value failing on access: not a mask
                continue
        for series_uid in referenced:
            found[series_uid].append(entry.path)
    return dict(found)


def seg_mask(path: Path | str, volume: Volume) -> np.ndarray:
    """The SEG's segments (any segment = 1) on `volume`'s grid: uint8 (rows, columns, slices)."""
    try:
        seg = hd.seg.segread(path)
        referenced = {str(sop) for _, series, sop in seg.get_source_image_uids()
                      if str(series) == volume.series_uid}
        if not referenced & {f.sop_uid for f in volume.frames}:
            raise MaskProblem(f"DICOM SEG {path} references no instance of series "
                              f"{volume.series_uid}: it segments another series")
        if volume.enhanced:
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=volume.frames[0].sop_uid,
                source_frame_numbers=[f.frame or 0 for f in volume.frames], combine_segments=True,
                assert_missing_frames_are_empty=True)
        else:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[f.sop_uid for f in volume.frames],
                combine_segments=True, assert_missing_frames_are_empty=True)
    except MaskProblem:
        raise
    except Exception as err:  # highdicom raises ValueError/KeyError/AttributeError for a bad SEG
        raise MaskProblem(f"DICOM SEG {path} cannot be read onto series {volume.series_uid} "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    mask = np.moveaxis(np.asarray(pixels), 0, -1)
    if mask.shape != volume.shape:
        raise MaskProblem(f"DICOM SEG {path} has shape {mask.shape} on series "
                          f"{volume.series_uid}, whose volume is {volume.shape}")
    return (mask > 0).astype(np.uint8)

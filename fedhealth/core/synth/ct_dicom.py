"""Write one synthetic CT series as DICOM: CT Image Storage (one file per slice), or one
multi-frame Legacy Converted Enhanced CT object (highdicom), and its lesion as a DICOM SEG.

Every UID and date is passed in, so the classic files are byte-identical for a seed.
"""

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from fedhealth.core.synth.ct_phantom import SliceGrid
from fedhealth.core.synth.ct_vendors import CTVendor
from fedhealth.core.synth.dicom import ImageIds

SOFTWARE = "fedhealth synth"


@dataclass(frozen=True)
class SeriesIds:
    """The study-level identity (`study` holds patient and study fields; its sop/series UIDs are
    unused) and the UIDs of this series: one per slice, the frame of reference, a SEG's."""

    study: ImageIds
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[str, ...]
    series_number: int


def slice_datasets(stored: np.ndarray, grid: SliceGrid, vendor: CTVendor,
                   ids: SeriesIds) -> list[Dataset]:
    """One CT Image Storage dataset per slice (`stored`: uint16, (slices, rows, columns) in the
    grid's order), numbered as the vendor numbers them."""
    slices = grid.slices
    numbers = (range(1, slices + 1) if _numbered_along_normal(grid, vendor)
               else range(slices, 0, -1))
    return [_slice(stored[k], grid, k, n, vendor, ids) for k, n in zip(range(slices), numbers)]


def _numbered_along_normal(grid: SliceGrid, vendor: CTVendor) -> bool:
    """Whether InstanceNumber grows along the slice normal: "caudal" numbers from the feet up."""
    towards_head = grid.normal[2] > 0
    return towards_head == (vendor.numbering == "caudal")


def _slice(pixels: np.ndarray, grid: SliceGrid, k: int, number: int, vendor: CTVendor,
           ids: SeriesIds) -> Dataset:
    s = ids.study
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ids.sop_uids[k]
    ds.PatientName, ds.PatientID = s.patient_name, s.patient_id
    ds.PatientBirthDate, ds.PatientSex = s.birth_date, s.sex
    ds.StudyInstanceUID, ds.StudyID = s.study_uid, s.accession[-8:]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = s.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "090000"
    ds.AccessionNumber, ds.ReferringPhysicianName = s.accession, ""
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST", f"CHEST {vendor.kernel}"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", ids.series_uid, ids.series_number
    ds.PatientPosition, ds.BodyPartExamined = vendor.patient_position, "CHEST"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ids.frame_of_reference_uid, ""
    ds.Manufacturer, ds.ManufacturerModelName = vendor.manufacturer, vendor.model
    ds.InstitutionName, ds.DeviceSerialNumber, ds.SoftwareVersions = s.institution, "1", SOFTWARE
    ds.InstanceNumber, ds.AcquisitionNumber = number, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BurnedInAnnotation = "NO"
    position = grid.slice_position(k)
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [*grid.row_dir, *grid.column_dir]
    ds.PixelSpacing = [round(grid.pixel_mm, 6)] * 2
    ds.SliceThickness = ds.SpacingBetweenSlices = grid.spacing_between_mm
    ds.SliceLocation = round(float(np.dot(position, grid.normal)), 4)
    ds.KVP, ds.ConvolutionKernel = 120, vendor.kernel
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = (vendor.rescale_intercept,
                                                            vendor.rescale_slope, "HU")
    ds.WindowCenter, ds.WindowWidth = -500, 1500  # a lung window
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def enhanced_dataset(slices: list[Dataset], ids: SeriesIds, sop_uid: str) -> Dataset:
    """The series as one multi-frame object: highdicom's Legacy Converted Enhanced CT Image,
    whose per-frame functional groups carry each slice's position, orientation and spacing."""
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=ids.series_uid, series_number=ids.series_number,
        sop_instance_uid=sop_uid, instance_number=1)


def segmentation(sources: list[Dataset], mask: np.ndarray, vendor: CTVendor, series_uid: str,
                 sop_uid: str) -> Dataset:
    """The lesion as a binary DICOM SEG referencing `sources` (slice datasets, or one multi-frame
    dataset whose frames `mask`'s first axis follows): what a hospital's annotation tool writes."""
    lesion = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT",
                                                       "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[lesion],
        series_instance_uid=series_uid, series_number=99, sop_instance_uid=sop_uid,
        instance_number=1, manufacturer=vendor.manufacturer,
        manufacturer_model_name=vendor.model, software_versions=SOFTWARE,
        device_serial_number="1", omit_empty_frames=False)


def save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)

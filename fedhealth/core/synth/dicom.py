"""Write one synthetic radiograph as a DICOM Part 10 file: DX For Presentation or CR Image Storage.

DX fixes the rescale at slope 1 / intercept 0, so vendors with another rescale write CR, as real
computed-radiography systems do.

Every UID and date is passed in, so files are byte-identical for a seed.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from fedhealth.core.synth.phantom import Radiograph
from fedhealth.core.synth.vendors import Vendor


@dataclass(frozen=True)
class ImageIds:
    """Who and when: the Patient / Study / Series / Instance hierarchy of one image."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: str
    accession: str
    institution: str


def stored_pixels(image: Radiograph, vendor: Vendor) -> np.ndarray:
    """Presentation intensities -> the detector's stored values (bit depth, photometric)."""
    values = image.intensity if vendor.photometric == "MONOCHROME2" else 1 - image.intensity
    return np.round(values * (2**vendor.bits_stored - 1)).astype(np.uint16)


def write_image(path: Path, image: Radiograph, vendor: Vendor, ids: ImageIds) -> None:
    """Write `image` as a DX For Presentation or CR instance (as `vendor.modality` says) to `path`."""
    pixels = stored_pixels(image, vendor)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _SOP_CLASS[vendor.modality]
    ds.SOPInstanceUID = ids.sop_uid
    # Patient / General Study
    ds.PatientName, ds.PatientID = ids.patient_name, ids.patient_id
    ds.PatientBirthDate, ds.PatientSex = ids.birth_date, ids.sex
    ds.StudyInstanceUID, ds.StudyID = ids.study_uid, ids.accession[-8:]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ids.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber, ds.ReferringPhysicianName = ids.accession, ""
    ds.StudyDescription = "CHEST PA"
    # General Series / General Equipment / General Image
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = vendor.modality, ids.series_uid, 1
    ds.Manufacturer, ds.ManufacturerModelName = vendor.manufacturer, vendor.model
    ds.InstitutionName = ids.institution
    ds.InstanceNumber, ds.PatientOrientation = 1, ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    # Image Pixel, Modality LUT (DX: slope 1, intercept 0), VOI LUT
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, vendor.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, vendor.bits_stored, vendor.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = vendor.rescale_intercept, vendor.rescale_slope
    ds.RescaleType = "US"
    max_value = vendor.rescale_slope * (2**vendor.bits_stored - 1)
    ds.WindowCenter = round(vendor.rescale_intercept + max_value / 2, 1)
    ds.WindowWidth = round(max_value, 1)
    ds.ImagerPixelSpacing = ds.PixelSpacing = [round(image.spacing_mm, 6)] * 2
    if vendor.modality == "DX":
        _add_dx_modules(ds, vendor)
    ds.PixelData = pixels.tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _add_dx_modules(ds: Dataset, vendor: Vendor) -> None:
    """What the DX IOD requires beyond CR: presentation intent, anatomy and view codes, detector."""
    if vendor.rescale_slope != 1 or vendor.rescale_intercept != 0:
        raise ValueError(f"{vendor.model}: the DX IOD fixes RescaleSlope 1, RescaleIntercept 0")
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.ViewCodeSequence = Sequence([_code("399348003", "SCT", "postero-anterior")])
    ds.PositionerType = "NONE"
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1 if vendor.photometric == "MONOCHROME2" else -1
    ds.PresentationLUTShape = "IDENTITY" if vendor.photometric == "MONOCHROME2" else "INVERSE"
    ds.DetectorType = "SCINTILLATOR"


_SOP_CLASS = {"DX": DigitalXRayImageStorageForPresentation, "CR": ComputedRadiographyImageStorage}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item

"""CT scanner vendors of the synthetic CT federation: what a hospital's CT protocol does to a volume.

Header-level differences (slice thickness, pixel spacing, rescale, head-first or feet-first,
the order instances are numbered in, classic or Enhanced multi-frame storage) must be undone by a
correct site pipeline; the reconstruction kernel's noise and sharpness survive it and are the
feature shift a federation lives with.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class CTVendor:
    """One CT scanner model and its chest protocol, as written into every series it makes.

    fov_mm: reconstruction field of view (pixel spacing = fov_mm / columns).
    kernel: the ConvolutionKernel name; noise_hu and blur_mm / sharpen its effect on the image.
    patient_position: "HFS" (head first supine) or "FFS" (feet first supine): FFS flips the
        patient's left-right axis in the image rows and reverses the slice normal.
    numbering: "caudal" numbers instances from the feet up, "cranial" from the head down, so
        InstanceNumber order says nothing about position.
    enhanced_share: share of its series stored as one multi-frame Enhanced CT object (highdicom's
        Legacy Converted Enhanced CT) instead of one file per slice.
    """

    manufacturer: str
    model: str
    slice_thickness_mm: float
    fov_mm: float
    kernel: str
    noise_hu: float
    blur_mm: float
    sharpen: float
    rescale_slope: float
    rescale_intercept: float
    patient_position: str
    numbering: str
    enhanced_share: float


CT_VENDORS = (
    CTVendor("Helios Imaging", "HX CT 64", 5.0, 360.0, "STANDARD", 12.0, 1.0, 0.0, 1.0, -1024.0,
             "HFS", "caudal", 0.0),
    CTVendor("Nordlicht Medical", "NL Volume 128", 4.0, 400.0, "B70f", 30.0, 0.0, 0.6, 1.0,
             -1024.0, "FFS", "cranial", 0.0),
    CTVendor("Kestrel Systems", "KCT-16", 6.0, 330.0, "SOFT", 6.0, 2.0, 0.0, 0.5, -1000.0,
             "HFS", "cranial", 0.5),
)


def ct_vendor_for_site(site_index: int) -> CTVendor:
    """Hospital `site_index`'s CT vendor (the list repeats)."""
    return CT_VENDORS[site_index % len(CT_VENDORS)]

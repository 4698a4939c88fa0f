"""Scanner vendors of the synthetic federation: what a hospital's X-ray system does to its images.

Feature shift between hospitals comes from here. Header-level differences (bit depth, rescale
intercept, MONOCHROME1 vs 2) must be undone by a correct site pipeline; image-level ones (gamma,
noise, blur, field of view) survive any normalisation and are the shift a federation has to live with.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Vendor:
    """One detector model and its processing, as written into (and onto) every image it makes."""

    manufacturer: str
    model: str
    modality: str  # "DX" (Digital X-Ray, rescale fixed at 1/0 by the IOD) or "CR" (any rescale)
    photometric: str  # "MONOCHROME1" stores dense as dark, "MONOCHROME2" as bright
    bits_stored: int
    rescale_intercept: float
    rescale_slope: float
    spacing_scale: float  # x nominal spacing: a wider field of view shrinks the anatomy in pixels
    noise: float  # Gaussian noise sigma, in [0, 1] intensity units
    gamma: float  # display curve the vendor burns into "for presentation" images
    blur_mm: float  # detector unsharpness
    file_suffix: str


REFERENCE = Vendor("Helios Imaging", "HX-1 DR", "DX", "MONOCHROME2", 12, 0.0, 1.0,
                   1.0, 0.03, 1.0, 0.0, ".dcm")

# The vendors at scanner_shift = 1; hospital k gets VENDORS[k % len(VENDORS)]. They differ most in
# what a site's normalisation layers can learn to undo (contrast curve, noise level) and keep the
# finding visible: a detector that blurs nodules away makes a harder site, not a shifted one, and no
# method can recover what it erased (an earlier list did, and FedBN then could not beat FedAvg).
VENDORS = (
    REFERENCE,
    Vendor("Nordlicht Medical", "NL-CR 500", "CR", "MONOCHROME1", 14, -1024.0, 1.0,
           1.1, 0.06, 0.45, 1.0, ""),
    Vendor("Kestrel Systems", "KCR-9", "CR", "MONOCHROME2", 10, 0.0, 2.0,
           0.95, 0.02, 2.2, 0.0, ".DCM"),
    Vendor("Tamarind Radiology", "TR-4 Flat Panel", "DX", "MONOCHROME1", 16, 0.0, 1.0,
           1.0, 0.08, 0.7, 2.0, ".dcm"),
)


def vendor_for_site(site_index: int, scanner_shift: float) -> Vendor:
    """Site `site_index`'s vendor, its image-level effects scaled by `scanner_shift` (0: all identical).

    Header-level traits are discrete: any shift > 0 gives the site its vendor's name, bit depth,
    intercept and photometric interpretation.
    """
    if scanner_shift < 0:
        raise ValueError(f"scanner_shift must be >= 0, got {scanner_shift}")
    target = VENDORS[site_index % len(VENDORS)]
    if scanner_shift == 0:
        return REFERENCE

    def lerp(a: float, b: float) -> float:
        return max(0.0, a + scanner_shift * (b - a))

    return replace(
        target,
        spacing_scale=lerp(REFERENCE.spacing_scale, target.spacing_scale),
        noise=lerp(REFERENCE.noise, target.noise),
        gamma=max(0.1, lerp(REFERENCE.gamma, target.gamma)),
        blur_mm=lerp(REFERENCE.blur_mm, target.blur_mm),
    )

"""A chest-radiograph-like phantom with an optional nodule: the learnable finding.

Anatomy is drawn in millimetres, so a vendor's pixel spacing changes how big it looks in pixels.
"""

from dataclasses import dataclass

import numpy as np

from fedhealth.core.synth.vendors import Vendor

NOMINAL_FOV_MM = 400.0


@dataclass(frozen=True)
class Radiograph:
    """One rendered image: presentation intensities in [0, 1] (dense = bright) and the nodule mask."""

    intensity: np.ndarray  # float64 [S, S]
    mask: np.ndarray  # uint8 [S, S], 1 inside the nodule
    spacing_mm: float


def pixel_spacing(size: int, vendor: Vendor) -> float:
    """Detector pixel spacing (mm) for a `size` x `size` image from `vendor`."""
    return NOMINAL_FOV_MM / size * vendor.spacing_scale


def render(rng: np.random.Generator, size: int, vendor: Vendor, nodule_mm: float | None,
           nodule_contrast: float = 0.3) -> Radiograph:
    """Draw body, lungs, mediastinum and texture; add a nodule of radius `nodule_mm` in a lung,
    `nodule_contrast` brighter than its surroundings at its centre (before the vendor's curve)."""
    spacing = pixel_spacing(size, vendor)
    coords = (np.arange(size) - (size - 1) / 2) * spacing
    y, x = np.meshgrid(coords, coords, indexing="ij")

    body_a, body_b = 170 * rng.uniform(0.92, 1.08), 190 * rng.uniform(0.92, 1.08)
    img = 0.05 + 0.5 * soft_inside((x / body_a) ** 2 + (y / body_b) ** 2, spacing / body_a)
    lung_a, lung_b, lung_y = 55 * rng.uniform(0.9, 1.1), 115 * rng.uniform(0.9, 1.1), -10.0
    lungs = []
    for side in (-1, 1):
        cx = side * 75 * rng.uniform(0.93, 1.07)
        lungs.append((cx, lung_y))
        img -= 0.3 * soft_inside(((x - cx) / lung_a) ** 2 + ((y - lung_y) / lung_b) ** 2,
                                  spacing / lung_a)
    img += 0.15 * soft_inside((x / 22) ** 2 + ((y + 20) / 170) ** 4, spacing / 22)
    img += 0.04 * _smooth_noise(rng, size, sigma_px=max(1.0, 8.0 / spacing))

    mask = np.zeros((size, size), dtype=np.uint8)
    if nodule_mm:
        cx, cy = lungs[rng.integers(2)]
        angle, radius = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.45))
        nx, ny = cx + radius * lung_a * np.cos(angle), cy + radius * lung_b * np.sin(angle)
        r = nodule_mm
        d2 = ((x - nx) ** 2 + (y - ny) ** 2) / r**2
        img += nodule_contrast * np.clip(1 - d2, 0, None) ** 0.5
        mask[d2 < 1] = 1

    if vendor.blur_mm > 0:
        img = gaussian_blur(img, vendor.blur_mm / spacing)
    img = np.clip(img, 0, 1) ** vendor.gamma
    img = img + rng.normal(0.0, vendor.noise, img.shape)
    return Radiograph(np.clip(img, 0, 1), mask, spacing)


def soft_inside(r2: np.ndarray, edge: float) -> np.ndarray:
    """1 inside the unit level set of `r2`, 0 outside, with an edge about one pixel wide."""
    return 1 / (1 + np.exp((np.sqrt(r2) - 1) / max(edge, 1e-3)))


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Low-frequency texture, unit standard deviation."""
    field = gaussian_blur(rng.normal(size=(size, size)), sigma_px)
    return field / (field.std() + 1e-8)


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (numpy only; no SciPy dependency)."""
    radius = max(1, int(3 * sigma_px))
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-(t**2) / (2 * sigma_px**2))
    kernel /= kernel.sum()
    padded = np.pad(img, radius, mode="reflect")
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="valid")

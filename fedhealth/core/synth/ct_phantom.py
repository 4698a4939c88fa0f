"""A chest CT phantom in Hounsfield units, with an optional lesion in a lung or the liver.

Anatomy is a function of patient coordinates (DICOM LPS, millimetres), so it is drawn on whatever
grid a scanner's geometry defines: the same patient scanned head-first and feet-first, at another
slice thickness or field of view, is the same anatomy sampled differently.
"""

from dataclasses import dataclass

import numpy as np

from fedhealth.core.synth.ct_vendors import CTVendor
from fedhealth.core.synth.phantom import gaussian_blur, soft_inside

#: The scanned range (mm along the patient's axis), whatever the slice thickness.
SCAN_LENGTH_MM = 120.0
ORGANS = ("lung", "liver")


@dataclass(frozen=True)
class Anatomy:
    """One patient's random anatomy and lesion (None: no finding), independent of the scanner."""

    body: tuple[float, float]  # semi-axes (x, y) mm
    lungs: tuple[tuple[float, float, float], ...]  # centres (x, y, z) mm
    lung_axes: tuple[float, float, float]
    liver: tuple[float, float, float]
    lesion: tuple[float, float, float, float] | None  # centre (x, y, z) and radius, mm
    lesion_organ: str | None
    texture_seed: int


@dataclass(frozen=True)
class SliceGrid:
    """Where a series' voxels sit: slice k, row r, column c is at
    position + k * spacing_between * normal + r * pixel * column_dir + c * pixel * row_dir."""

    rows: int
    columns: int
    slices: int
    pixel_mm: float
    spacing_between_mm: float
    row_dir: tuple[float, float, float]  # ImageOrientationPatient[:3]
    column_dir: tuple[float, float, float]  # ImageOrientationPatient[3:]
    position: tuple[float, float, float]  # ImagePositionPatient of slice 0

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.column_dir)

    def slice_position(self, k: int) -> tuple[float, float, float]:
        p = np.asarray(self.position) + k * self.spacing_between_mm * self.normal
        return tuple(float(round(v, 4)) for v in p)  # type: ignore[return-value]

    def coordinates(self) -> np.ndarray:
        """Patient coordinates of every voxel, shape (3, slices, rows, columns)."""
        k, r, c = np.meshgrid(np.arange(self.slices), np.arange(self.rows),
                              np.arange(self.columns), indexing="ij")
        origin = np.asarray([self.slice_position(0)]).reshape(3, 1, 1, 1)
        steps = (self.spacing_between_mm * self.normal, self.pixel_mm * np.asarray(self.column_dir),
                 self.pixel_mm * np.asarray(self.row_dir))
        return origin + sum(np.asarray(s).reshape(3, 1, 1, 1) * i for s, i in zip(steps, (k, r, c)))


def scanner_grid(vendor: CTVendor, size: int) -> SliceGrid:
    """The axial grid `vendor` reconstructs a chest scan on: `size` x `size` pixels over its field
    of view, slices of its thickness over SCAN_LENGTH_MM, slice 0 at the low end of the normal.

    Head-first supine: rows run to the patient's left (+x), the normal to the head (+z).
    Feet-first supine: the scanner sees the patient turned end over end, so rows run to the
    patient's right (-x) and the normal points to the feet (-z).
    """
    pixel = vendor.fov_mm / size
    slices = round(SCAN_LENGTH_MM / vendor.slice_thickness_mm)
    half_fov, half_z = (size - 1) / 2 * pixel, (slices - 1) / 2 * vendor.slice_thickness_mm
    if vendor.patient_position == "HFS":
        row_dir, start = (1.0, 0.0, 0.0), (-half_fov, -half_fov, -half_z)
    elif vendor.patient_position == "FFS":
        row_dir, start = (-1.0, 0.0, 0.0), (half_fov, -half_fov, half_z)
    else:
        raise ValueError(f"{vendor.model}: patient position {vendor.patient_position!r} is not "
                         "HFS or FFS")
    return SliceGrid(size, size, slices, pixel, vendor.slice_thickness_mm, row_dir,
                     (0.0, 1.0, 0.0), start)


def draw_anatomy(rng: np.random.Generator, lesion_mm: float | None,
                 organ: str = "lung") -> Anatomy:
    """A patient: body, lungs and liver sizes jittered; a lesion of radius `lesion_mm` placed at
    random well inside the `organ` (lung or liver)."""
    if organ not in ORGANS:
        raise ValueError(f"lesion organ {organ!r}: choose one of {', '.join(ORGANS)}")
    jitter = rng.uniform(0.92, 1.08, size=4)
    lung_axes = (48 * jitter[1], 70 * jitter[2], 55.0)
    lungs = tuple((side * 70 * jitter[3], -5.0, 25.0) for side in (-1, 1))
    liver = (-55.0, 5.0, -35.0)
    lesion = None
    if lesion_mm:
        if organ == "lung":
            cx, cy, cz = lungs[int(rng.integers(2))]
            axes = (lung_axes[0] - lesion_mm, lung_axes[1] - lesion_mm, 25.0)
        else:
            (cx, cy, cz), axes = liver, (40.0, 30.0, 12.0)
        u = rng.uniform(-1, 1, size=3) * 0.6
        lesion = (cx + u[0] * axes[0], cy + u[1] * axes[1], cz + u[2] * axes[2], lesion_mm)
    return Anatomy((150 * jitter[0], 110 * jitter[0]), lungs, lung_axes, liver, lesion,
                   organ if lesion_mm else None, int(rng.integers(2**31)))


def render_hu(anatomy: Anatomy, grid: SliceGrid, vendor: CTVendor) -> tuple[np.ndarray, np.ndarray]:
    """(Hounsfield units, lesion mask), each (slices, rows, columns) in the grid's order, with
    the vendor's kernel: noise, then its blur or edge enhancement, in plane."""
    x, y, z = grid.coordinates()
    edge = grid.pixel_mm
    hu = -1000 + 1040 * soft_inside((x / anatomy.body[0]) ** 2 + (y / anatomy.body[1]) ** 2,
                                    edge / anatomy.body[0])
    lung_a, lung_b, lung_c = anatomy.lung_axes
    for cx, cy, cz in anatomy.lungs:
        inside = soft_inside(((x - cx) / lung_a) ** 2 + ((y - cy) / lung_b) ** 2
                             + ((z - cz) / lung_c) ** 2, edge / lung_a)
        hu = hu - 890 * inside
    lx, ly, lz = anatomy.liver
    liver = soft_inside(((x - lx) / 70) ** 2 + ((y - ly) / 60) ** 2 + ((z - lz) / 30) ** 2,
                        edge / 60)
    hu = hu + liver * (60 - hu) * (z < -5)
    hu = hu + 660 * soft_inside((x / 14) ** 2 + ((y - 80) / 14) ** 2, edge / 14)  # spine
    mask = np.zeros(hu.shape, dtype=np.uint8)
    if anatomy.lesion is not None:
        ex, ey, ez, r = anatomy.lesion
        d2 = ((x - ex) ** 2 + (y - ey) ** 2 + (z - ez) ** 2) / r**2
        target = 40.0 if anatomy.lesion_organ == "lung" else -10.0
        weight = soft_inside(d2, edge / r)
        hu = hu + weight * (target - hu)
        mask[d2 < 1] = 1
    rng = np.random.default_rng(anatomy.texture_seed)
    hu = hu + vendor.noise_hu * rng.normal(size=hu.shape)
    planes = []
    for plane in hu:
        if vendor.blur_mm > 0:
            plane = gaussian_blur(plane, vendor.blur_mm / grid.pixel_mm)
        if vendor.sharpen > 0:
            plane = plane + vendor.sharpen * (plane - gaussian_blur(plane, 1.0))
        planes.append(plane)
    return np.stack(planes), mask


def stored_values(hu: np.ndarray, vendor: CTVendor) -> np.ndarray:
    """Hounsfield units -> the scanner's stored uint16 values (HU = stored * slope + intercept)."""
    stored = np.round((hu - vendor.rescale_intercept) / vendor.rescale_slope)
    return np.clip(stored, 0, 2**16 - 1).astype(np.uint16)

"""Exact weighted sums on a fixed-point grid: the arithmetic encrypted and plaintext runs share.

Why. CKKS decryption adds ~1e-9 of noise to every value, and local training (Adam, several
epochs) amplifies any difference in the global it starts from, so an encrypted run and a
plaintext run of the same seed used to drift apart (0.05 in per-site balanced accuracy after
8 rounds). Noise that cannot be removed can be made irrelevant: each site's term a_k * w_k is
rounded to a multiple of `STEP` before it is encrypted (or, in plaintext runs, summed). A sum
of grid values is a grid value, so rounding the decrypted sum to the nearest grid point gives
the exact sum whenever the CKKS error is below STEP / 2; dividing it by s = `weight_sum(a)`
then gives the same float64 global, bit for bit, in both modes.

Exactness without encryption. Every term is k * 2^-GRID_BITS with |k| <= 2^(GRID_BITS +
MAX_TERM_BITS) = 2^40. A float64 holds every multiple of 2^-GRID_BITS up to 2^53 of them,
i.e. every grid value below 2^(53 - GRID_BITS) = 2^33 in magnitude; the partial sums of up to
`MAX_SITES` = 2^13 terms stay below that, so every addition is exact and the float64 sum is
the same in any order, equal to the integer sum of the k's times STEP.

What it costs. Each term moves by at most STEP / 2 ~ 4.8e-7, so the global mean moves by at
most K * STEP / (2 s): a quantisation far below what training changes in a round.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

GRID_BITS = 20
STEP = 2.0**-GRID_BITS
"""The grid step, 2^-20 ~ 9.5e-7. Chosen from the CKKS decode error measured at every preset
(benchmarks/grid_rounding.py): the largest |decrypted - exact| over a ciphertext summed from 100
sites is at most 5.7e-9 (`default`, `compact`) and 7.2e-9 (`nvflare`), growing as sqrt(K): ~2.3e-8
at 1000 sites. STEP / 2 = 4.8e-7 leaves a margin of 65x at 100 sites and 20x at 1000; a finer
grid (2^-24: margin 4x at 100 sites) would quantise less but could round a noisy sum the wrong
way."""
OFF_GRID_FRACTION = 1 / 8
"""Of a grid step, the largest distance a decrypted sum may lie from the grid, on any grid."""
OFF_GRID_TOLERANCE = STEP * OFF_GRID_FRACTION
"""Largest distance from the grid a decrypted sum may show (16x the error measured at 100
sites). Values from another key, damaged ciphertexts or anything not summed from grid values
land anywhere: each one passes with probability 1/4, a ciphertext of thousands essentially
never."""
MAX_TERM_BITS = 20
MAX_TERM = 2.0**MAX_TERM_BITS
"""Largest |a_k * w| a site's term may hold (CKKS presets refuse at 2^19 already)."""
MAX_SITES = 2**13
"""Terms that can be summed exactly in float64 (see the module docstring)."""


class OffGridError(ValueError):
    """A sum that should be made of grid values is not: it was not summed from them."""


def on_grid(vector: np.ndarray, weight: float) -> np.ndarray:
    """weight * vector rounded to the nearest multiple of STEP (ties to even), as float64.

    Scaling by a power of two is exact, so the only roundings are the product's and the one
    to the grid: the same inputs give the same bits on every machine and in both run modes.
    """
    weighted = np.asarray(vector, dtype=np.float64) * float(weight)
    if not np.all(np.abs(weighted) <= MAX_TERM):  # NaN fails too
        raise ValueError(f"a weighted value is {_largest(weighted):.3g}, at most {MAX_TERM:g} "
                         "can be summed exactly: the model's values must be finite and smaller")
    return np.ldexp(np.round(np.ldexp(weighted, GRID_BITS)), -GRID_BITS)


def sum_on_grid(terms: Iterable[np.ndarray]) -> np.ndarray:
    """The exact sum of `on_grid` terms (order-independent; see the module docstring)."""
    total: np.ndarray | None = None
    count = 0
    for term in terms:
        total = term.copy() if total is None else total + term
        count += 1
    if total is None:
        raise ValueError("no terms to sum")
    if count > MAX_SITES:
        raise ValueError(f"{count} terms, at most {MAX_SITES} sum exactly in float64")
    return total


@dataclass(frozen=True)
class GridDistance:
    """How far a decrypted vector lies from a grid: what an OffGridError says, in one summary
    that ranges decrypted apart (`chunk_pool`) combine."""

    values: int
    off: int  # values further than the tolerance from the grid (NaN counts as off)
    first_off: int  # index of the first such value, -1 if none
    largest: float  # largest distance, inf for NaN
    tolerance: float

    @classmethod
    def combine(cls, parts: Sequence["GridDistance"]) -> "GridDistance":
        """The summary of the concatenated vectors, in order."""
        first, start = -1, 0
        for part in parts:
            if first < 0 and part.first_off >= 0:
                first = start + part.first_off
            start += part.values
        return cls(start, sum(p.off for p in parts), first,
                   max((p.largest for p in parts), default=0.0),
                   max((p.tolerance for p in parts), default=0.0))

    def check(self) -> None:
        """Raise OffGridError when any value lies off the grid."""
        if self.off:
            raise OffGridError(
                f"{self.off} of {self.values} values lie off the grid (first at value "
                f"{self.first_off}; largest distance {self.largest:.3g}, tolerance "
                f"{self.tolerance:.3g}): not a sum of grid-rounded updates")


def nearest(summed: np.ndarray, grid_bits: int = GRID_BITS) -> tuple[np.ndarray, GridDistance]:
    """Each value rounded to the nearest multiple of 2^-grid_bits, and how far they lay from it.

    The tolerance is OFF_GRID_FRACTION of the step: OFF_GRID_TOLERANCE at GRID_BITS, 1/8 for
    integers (grid_bits 0, the quantized presets' counts).
    """
    summed = np.asarray(summed, dtype=np.float64)
    snapped = np.ldexp(np.round(np.ldexp(summed, grid_bits)), -grid_bits)
    deviation = np.abs(summed - snapped)
    tolerance = 2.0**-grid_bits * OFF_GRID_FRACTION
    off = ~(deviation <= tolerance)  # NaN counts as off
    count = int(off.sum())
    return snapped, GridDistance(len(summed), count, int(np.argmax(off)) if count else -1,
                                 _largest(deviation), tolerance)


def snap(summed: np.ndarray) -> np.ndarray:
    """The grid sum a noisy (decrypted) sum stands for: each value rounded to the grid.

    Raises OffGridError when a value lies further than OFF_GRID_TOLERANCE from the grid.
    """
    snapped, distance = nearest(summed)
    distance.check()
    return snapped


def weight_sum(weights: Iterable[float]) -> float:
    """s = sum a_k over the summed updates, correctly rounded (math.fsum): order-independent."""
    return math.fsum(weights)


def check_weight_sum(total_weight: float) -> None:
    """Refuse an s no mean can be divided by (checked before decrypting, and by `mean`)."""
    if not total_weight > 0:
        raise ValueError(f"weight sum s must be positive, got {total_weight}")


def mean(summed: np.ndarray, total_weight: float) -> np.ndarray:
    """The weighted mean the exact grid sum stands for: summed / s, in float64."""
    check_weight_sum(total_weight)
    return np.asarray(summed, dtype=np.float64) / total_weight


def _largest(values: np.ndarray) -> float:
    """max |value|, with NaN and inf shown as inf."""
    finite = np.where(np.isfinite(values), np.abs(values), np.inf)
    return float(np.max(finite, initial=0.0))

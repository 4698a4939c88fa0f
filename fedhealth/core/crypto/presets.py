"""Named CKKS parameter sets and the headroom check that keeps encrypted sums from overflowing.

The aggregator only adds ciphertexts, so no multiplication level is needed: the whole
coefficient modulus except TenSEAL's special (last) prime holds data. SEAL stores every
coefficient in 8 bytes, so a ciphertext of 2 polynomials costs 16 bytes per slot and data prime;
packing two values per (complex) slot halves that, and a seeded ciphertext, whose uniform half
is sent as the seed it was drawn from, halves it again.
"""

import math
from dataclasses import dataclass


class HeadroomError(ValueError):
    """Values (or their encrypted sum) could exceed what the preset's modulus can hold."""


@dataclass(frozen=True)
class CkksPreset:
    """One CKKS parameter set (TenSEAL's `poly_modulus_degree`, `coeff_mod_bit_sizes`, scale)
    and how sites pack values into it.

    `complex_slots`: two values per slot, as its real and imaginary part (N values per
    ciphertext instead of TenSEAL's N/2 reals). `seeded`: sites send SEAL's seeded form of a
    symmetric ciphertext (half the bytes; the aggregator re-derives the uniform half on load).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    complex_slots: bool = True
    seeded: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        if self.headroom_bits < 1:
            raise HeadroomError(
                f"CKKS preset '{self.name}': scale 2^{self.scale_bits} leaves no room in "
                f"{self.data_level_bits} data-level bits; lower scale_bits or add a prime"
            )

    @property
    def slots(self) -> int:
        """CKKS slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """The chunk one ciphertext carries: every slot once, or twice with complex slots."""
        return self.slots * (2 if self.complex_slots else 1)

    @property
    def data_level_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives in (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest absolute sum that still decodes (one bit goes to the sign)."""
        return self.data_level_bits - self.scale_bits - 1

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def check_headroom(self, largest_sum: float) -> None:
        """Refuse when `scale bits + log2(largest_sum)` reaches the data-level bits."""
        if not math.isfinite(largest_sum):
            raise HeadroomError(f"CKKS preset '{self.name}': values are not finite (NaN or inf)")
        if largest_sum > 0 and math.log2(largest_sum) >= self.headroom_bits:
            raise HeadroomError(
                f"CKKS preset '{self.name}' would overflow: the largest possible sum "
                f"{largest_sum:.3g} needs {math.log2(largest_sum) + self.scale_bits + 1:.1f} bits, "
                f"the data level has {self.data_level_bits} (scale 2^{self.scale_bits}); "
                f"keep |values| below {2.0**self.headroom_bits:.3g} or pick a preset with "
                "more data-level bits"
            )


PRESETS: dict[str, CkksPreset] = {
    p.name: p
    for p in (
        # Additions-only: one 60-bit data prime, two values per slot: 16 B/param.
        CkksPreset("default", 4096, (60, 49), 40),
        # The same, with seeded uplink ciphertexts: 8 B/param, slower to load at the aggregator.
        CkksPreset("compact", 4096, (60, 49), 40, seeded=True),
        # NVIDIA FLARE's defaults and packing (TenSEAL real vectors), kept for comparison:
        # 100 data-level bits, ~57 B/param once SEAL's zstd squeezes the 40-bit primes.
        CkksPreset("nvflare", 8192, (60, 40, 40), 40, complex_slots=False),
    )
}


def get_preset(name: str) -> CkksPreset:
    """Look a preset up by name; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown crypto preset '{name}'; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None

"""Named CKKS parameter sets and the headroom check that keeps encrypted sums from overflowing.

The aggregator only adds ciphertexts, so no multiplication level is needed: the whole
coefficient modulus except TenSEAL's special (last) prime holds data. SEAL stores every
coefficient in 8 bytes, so a ciphertext of 2 polynomials costs 16 bytes per slot and data prime;
packing two values per (complex) slot halves that, and a seeded ciphertext, whose uniform half
is sent as the seed it was drawn from, halves it again. Below that, a preset with a
`Quantization` packs several small integers into every real (`packed_digits`): each site rounds
a_k * w stochastically to a grid, and the digits are sized here, from the headroom and the
number of sites, so that a sum of `max_sites` updates never carries from one digit into the next.
"""

import math
from dataclasses import dataclass


class HeadroomError(ValueError):
    """Values (or their encrypted sum) could exceed what the preset's modulus can hold."""


@dataclass(frozen=True)
class Quantization:
    """Each site's a_k * w as an integer count of steps (stochastic rounding), packed as digits.

    Ranges. Every ciphertext has its own range 2^r (|w| <= 2^r is sent; beyond it is refused,
    never wrapped) split into 2^level_bits steps each side. Sites derive r from the global they
    received, which every site decrypted to the same bits: the ciphertext's largest |value|
    there, times 2^margin_bits (room for one round of training), at least 2^floor_bits; with
    no global (round 1, every site starts from the run seed's model) r = first_bits. Each site
    encrypts r beside its data, so a global says which ranges it was made with.

    The aggregator needs none of this (it adds ciphertexts); sites derive everything from the
    preset, which is part of the federation's key files. `max_sites` is a promise the
    aggregator must keep (sum at most that many updates); sites verify it after decrypting.
    """

    level_bits: int  # steps per range: |a_k w| / step <= 2^level_bits for a_k <= 1
    first_bits: int  # r without a received global
    floor_bits: int  # the smallest r
    margin_bits: int  # r exceeds the received global's largest value by this many bits
    max_sites: int

    @property
    def levels(self) -> int:
        """Largest |sum_k a_k w_k| / step over sites with s = sum a_k <= 1."""
        return 2**self.level_bits

    @property
    def largest_digit(self) -> int:
        """Largest |sum of q_k| in one digit: `levels`, plus less than one step per site that
        stochastic rounding (q = floor(x + u)) may add to |x|."""
        return self.levels + self.max_sites

    @property
    def digit_bits(self) -> int:
        """Width b of a signed digit: |digit sum| <= largest_digit < 2^(b-1), so centred base-2^b
        decoding gives every digit back without a carry into its neighbour."""
        return self.largest_digit.bit_length() + 1

    def range_bits(self, received_largest: float | None) -> int:
        """r for a ciphertext whose values' largest |value| in the received global is given."""
        if received_largest is None:
            return self.first_bits
        if not received_largest > 0:  # all zeros
            return self.floor_bits
        return max(self.floor_bits, math.ceil(math.log2(received_largest)) + self.margin_bits)

    @property
    def largest(self) -> float:
        """The largest |w| a site may send without a received global."""
        return 2.0**self.first_bits

    def step(self, range_bits: int) -> float:
        return 2.0 ** (range_bits - self.level_bits)

    def mean_error(self, sites: int, weight_sum: float, range_bits: int | None = None) -> float:
        """Bound on |decrypted mean - exact weighted mean| in a ciphertext of range 2^range_bits
        (first_bits if None): each site's term moves by less than one step, and the sum is
        divided by s."""
        return sites * self.step(self.first_bits if range_bits is None else range_bits) / weight_sum


@dataclass(frozen=True)
class CkksPreset:
    """One CKKS parameter set (TenSEAL's `poly_modulus_degree`, `coeff_mod_bit_sizes`, scale)
    and how sites pack values into it.

    `complex_slots`: two values per slot, as its real and imaginary part (N values per
    ciphertext instead of TenSEAL's N/2 reals). `seeded`: sites send SEAL's seeded form of a
    symmetric ciphertext (half the bytes; the aggregator re-derives the uniform half on load).
    `quantization`: pack `digits_per_real` quantized values into every real (None: one value on
    `fixed_point`'s grid per real).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    complex_slots: bool = True
    seeded: bool = False
    quantization: Quantization | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        if self.headroom_bits < 1:
            raise HeadroomError(
                f"CKKS preset '{self.name}': scale 2^{self.scale_bits} leaves no room in "
                f"{self.data_level_bits} data-level bits; lower scale_bits or add a prime"
            )
        if self.quantization is not None and self.digits_per_real < 1:
            raise HeadroomError(
                f"CKKS preset '{self.name}': a digit of {self.quantization.digit_bits} bits "
                f"(levels {self.quantization.levels} + {self.quantization.max_sites} sites) does "
                f"not fit in {self.headroom_bits} bits of headroom; lower level_bits, "
                "max_sites or scale_bits"
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
    def digits_per_real(self) -> int:
        """Quantized values per real: n digits of b bits sum to |X| < 2^(n*b - 1), which must
        stay below 2^headroom_bits; 1 without quantization."""
        if self.quantization is None:
            return 1
        return (self.headroom_bits + 1) // self.quantization.digit_bits

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
        # Seeded, quantized and packed: 2^12 steps per range and side, at most 32 sites. Scale
        # 2^17 keeps the CKKS noise of a 32-site sum below 0.03 of an integer (measured: 625 *
        # sqrt(K) / 2^17), leaving 42 bits of headroom per real: 3 digits of 14 bits, 2.7 B/param.
        CkksPreset("packed", 4096, (60, 49), 17, seeded=True, quantization=Quantization(
            level_bits=12, first_bits=2, floor_bits=0, margin_bits=2, max_sites=32)),
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

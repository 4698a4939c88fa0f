"""Quantized values as signed base-2^b digits of one real: several parameters per CKKS value.

Why. A CKKS real at the `packed` preset's scale holds any integer below 2^42 exactly once the
noise is rounded away, far more than one quantized parameter needs. Writing n small integers
d_0..d_{n-1} as X = sum_j d_j 2^(b j) puts n parameters into the room of one, and adding two
such X adds them digit by digit: the aggregator's plain ciphertext addition sums every
parameter at once. Digits are signed (centred, |d| < 2^(b-1)), so negative sums need no offset
that would depend on how many sites were summed; `presets.Quantization.digit_bits` sizes b so
that a sum of `max_sites` updates stays inside its digit.

Quantization is stochastic rounding, q = floor(a_k w / step + u) with u uniform in [0, 1): unbiased
(E[q] step = a_k w), so the rounding noise of the mean averages out over sites and rounds
instead of pushing every parameter the same way, and |q step - a_k w| < step. The step is a
power of two per ciphertext (`presets.Quantization`): a tensor of BatchNorm running variances
near 5 and one of convolution weights near 0.1 each get 2^12 steps over their own range.
"""

import numpy as np


def quantize(values: np.ndarray, weight: float, step_bits: int, noise: np.ndarray) -> np.ndarray:
    """Integer counts of the step 2^-step_bits for weight * values, stochastically rounded with
    `noise` in [0, 1).

    Callers refuse values beyond their range first, and weights above 1: a digit sized for
    s <= 1 could otherwise overflow into its neighbour.
    """
    scaled = np.ldexp(np.asarray(values, dtype=np.float64) * float(weight), step_bits)
    scaled += noise
    return np.floor(scaled, out=scaled).astype(np.int64)


def pack(counts: np.ndarray, digit_bits: int, per_real: int) -> np.ndarray:
    """Reals X_i = sum_j counts[i n + j] 2^(b j) (zero-padded to a multiple of n), as float64.

    |X| < 2^(n b - 1) <= 2^53, so float64 holds every X exactly.
    """
    padded = np.zeros(-(-len(counts) // per_real) * per_real, dtype=np.int64)
    padded[:len(counts)] = counts
    digits = padded.reshape(-1, per_real)
    shifts = np.arange(per_real, dtype=np.int64) * digit_bits
    return (digits << shifts).sum(axis=1).astype(np.float64)


def unpack(reals: np.ndarray, digit_bits: int, per_real: int, size: int) -> tuple[np.ndarray, int]:
    """The digit sums of integer-valued `reals` (the inverse of `pack` and of every sum of packs),
    and how many reals held more than n digits (a sum that left its digits: not ours, or too
    many sites)."""
    rest = np.asarray(reals, dtype=np.int64)
    half, mask = 1 << (digit_bits - 1), (1 << digit_bits) - 1
    digits = np.empty((len(rest), per_real), dtype=np.int64)
    for j in range(per_real):
        digit = ((rest + half) & mask) - half  # the centred residue: in [-2^(b-1), 2^(b-1))
        digits[:, j] = digit
        rest = (rest - digit) >> digit_bits
    return digits.reshape(-1)[:size], int(np.count_nonzero(rest))

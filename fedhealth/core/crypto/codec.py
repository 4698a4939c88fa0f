"""Site-side CKKS codec: tensors -> E(a_k w_k) ciphertexts, and E(global) -> checked tensors.

Sites multiply by their weight a_k in plaintext before encrypting, so the aggregator only
adds ciphertexts and never needs a multiplication level.

Check values. The aggregator cannot read what it sums, so the sum itself must show whether it
is what the protocol promises. The last `CHECK_VALUES` values of every ciphertext are constants
c derived from (training id, round, ciphertext index) that every site knows; a site encrypts
a_k * c there like any other value. The honest sum then decrypts to s * c in those slots, with
s = sum a_k, which the aggregator states. After decrypting, a site compares: a ciphertext made
under another secret key decrypts to noise of huge magnitude; SEAL keeps ciphertexts in NTT form,
so one changed bit scrambles every coefficient of its polynomial and the whole ciphertext
decrypts to noise; a site that multiplied by another weight moves s; a ciphertext made for
another round or position carries other constants. Each fails the check.
What it cannot catch: a site that knows the protocol can encrypt correct check values beside
poisoned data (CKKS is malleable; these are not a MAC), and perturbations below the tolerance.

The grid. Data values are encrypted as a_k * w rounded to `fixed_point.STEP`, so their sum is a
grid value: after decryption, rounding to the grid removes the CKKS noise exactly, and a value
far from the grid is a second corruption signal (checked after the check values, whose message
says more about the cause). Presets with a `Quantization` (`packed`) put integer counts of their
grid step into every real instead, several per real (`packed_digits`); rounding the decrypted
reals to integers removes the noise the same way. Their check values are multiplied by
2^(CHECK_SCALE_BITS - scale bits), so they keep the precision they have at scale 2^40, and
their updates start with a `Header` (the site count and every tensor's range).

Parallel. Ciphertexts are independent, so encryption and decryption run over ranges of them in
processes (`chunk_pool`), each range through the same function a serial call runs: the same
values on the same grid, with stochastic rounding drawn per ciphertext from a seed, so what a
parallel call's ciphertexts decrypt to is what a serial call's decrypt to, bit for bit.
"""

import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal
from flwr.app import ArrayRecord

from fedhealth.core import fixed_point
from fedhealth.core.crypto import packed_digits
from fedhealth.core.crypto.chunk_pool import (
    CALLER_OVERHEAD,
    MIN_PARALLEL_CIPHERTEXTS,
    Region,
    default_workers,
    here_and_away,
    parallel_available,
    shared_file,
)
from fedhealth.core.crypto.chunk_ranges import split
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.presets import CkksPreset, HeadroomError
from fedhealth.core.crypto.seal_bytes import SealSink, vector_bytes
from fedhealth.core.crypto.wire import chunk_sizes, ciphertexts_to_record, record_to_ciphertexts

CHECK_VALUES = 4
"""Values reserved at the end of every ciphertext (0.1% of `default`'s 4096)."""
CHECK_TOLERANCE = 1e-6
"""Largest |decrypted - s * c| accepted. CKKS noise at scale 2^40 is ~1e-9 per value and grows
with the square root of the number of sites. A change to the sum that moves the values of a
ciphertext by less than this would go unnoticed (and is then that small)."""
CHECK_SCALE_BITS = 40
"""Check values are encrypted at 2^CHECK_SCALE_BITS in effect, whatever the preset's scale."""
SEED_STRIDE = 97
"""Stochastic rounding's seed hashes every 97th value (with the round and weight): the same
update rounds the same way every time, two sites' updates differently, at ~1% of a full hash."""


class IntegrityError(ValueError):
    """A decrypted global fails its check values: it is not the sum of this round's updates."""


@dataclass(frozen=True)
class RoundBinding:
    """The training and round an update answers: its check values derive from these."""

    training_id: str
    server_round: int


UNBOUND = RoundBinding("", 0)
"""For measuring and testing the codec outside a federation run."""


def check_values(binding: RoundBinding, ciphertexts: int, first: int = 0) -> np.ndarray:
    """The constants c of ciphertexts first.., shape (ciphertexts, CHECK_VALUES): |c| in [0.5, 1),
    signs mixed."""
    rows = []
    for index in range(first, first + ciphertexts):
        digest = hashlib.sha256(f"fedhealth-check/1|{binding.training_id}|"
                                f"{binding.server_round}|{index}".encode()).digest()
        fraction = np.frombuffer(digest[:4 * CHECK_VALUES], dtype=">u4") / 2.0**32
        signs = np.where(np.unpackbits(np.frombuffer(digest[-1:], np.uint8))[:CHECK_VALUES], -1, 1)
        rows.append(signs * (0.5 + 0.5 * fraction))
    return np.array(rows, dtype=np.float64).reshape(ciphertexts, CHECK_VALUES)


def check_gain(preset: CkksPreset) -> float:
    """What reserved values are multiplied by: 1 at scale 2^40 and above."""
    return 2.0 ** max(0, CHECK_SCALE_BITS - preset.scale_bits)


def reserved_rows(preset: CkksPreset, binding: RoundBinding, ciphertexts: range,
                  weight: float) -> np.ndarray:
    """What a site encrypts in the check values of `ciphertexts`: weight * c, times the
    preset's check gain."""
    return check_values(binding, len(ciphertexts), ciphertexts.start) * weight * check_gain(preset)


@dataclass(frozen=True)
class Header:
    """The ciphertexts a quantized preset's update starts with: 1, r_t and r_t^2 per tensor t.

    Every site encrypts them unweighted, so the sum holds the site count K, K r_t and K r_t^2:
    a global states how many updates it sums (more than `max_sites` could have carried between
    digits) and the range of every tensor it was quantized with (so it needs no other state to
    be read), and sites that disagreed on a range leave sum(r^2)/K - (sum(r)/K)^2 > 0.
    """

    count: int
    range_bits: np.ndarray  # r_t per tensor, in layout order
    level_bits: int  # the preset's: a tensor's step is 2^(r_t - level_bits)

    @staticmethod
    def reals(tensors: int) -> int:
        return 1 + 2 * tensors

    def encode(self) -> np.ndarray:
        r = self.range_bits.astype(np.float64)
        return np.concatenate([[float(self.count)], r, r * r])

    @classmethod
    def decode(cls, summed: np.ndarray, preset: CkksPreset, binding: RoundBinding) -> "Header":
        """The summed header (integers once snapped), checked; IntegrityError if it is not one."""
        assert preset.quantization is not None
        tensors = (len(summed) - 1) // 2
        count, ranges, squares = summed[0], summed[1:1 + tensors], summed[1 + tensors:]
        if not 1 <= count <= preset.quantization.max_sites:
            raise IntegrityError(
                f"the global of round {binding.server_round} counts {count:g} summed updates, "
                f"preset '{preset.name}' holds 1 to {preset.quantization.max_sites} without a "
                "carry between its packed digits: the aggregator summed too many sites")
        agree = (ranges % count == 0) & (squares * count == ranges * ranges)
        if not agree.all():
            raise IntegrityError(
                f"the global of round {binding.server_round}: its sites quantized tensor "
                f"{int(np.argmin(agree))} of the layout to different ranges: they did not "
                "derive them from the same received global")
        return cls(int(count), (ranges // count).astype(np.int64), preset.quantization.level_bits)


def header_ciphertexts(preset: CkksPreset, layout: TensorLayout) -> int:
    """Ciphertexts before the data: a quantized preset's `Header`, none otherwise."""
    if preset.quantization is None:
        return 0
    return Packing(Header.reals(len(layout.entries)), preset.values_per_ciphertext).ciphertexts


@dataclass(frozen=True)
class Packing:
    """Where data and reserved values sit in the ciphertexts of a vector of `size` data reals."""

    size: int
    per_ciphertext: int
    reserved: int = CHECK_VALUES
    digits: int = 1  # parameters per data real

    @property
    def data_per_ciphertext(self) -> int:
        return self.per_ciphertext - self.reserved

    @property
    def params_per_ciphertext(self) -> int:
        return self.data_per_ciphertext * self.digits

    @property
    def ciphertexts(self) -> int:
        """At least one, so even an empty layout carries check values."""
        return max(1, -(-self.size // self.data_per_ciphertext))

    @property
    def payload_size(self) -> int:
        return self.size + self.ciphertexts * self.reserved

    def join(self, vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Data chunk i followed by its reserved values, for every i."""
        step = self.data_per_ciphertext
        parts = []
        for i in range(self.ciphertexts):
            parts += [vector[i * step:(i + 1) * step], rows[i]]
        return np.concatenate(parts)

    def split(self, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of `join`: (data vector, reserved values per ciphertext)."""
        per = self.per_ciphertext
        chunks = [payload[i * per:(i + 1) * per] for i in range(self.ciphertexts)]
        vector = np.concatenate([chunk[:-self.reserved] for chunk in chunks])
        rows = np.array([chunk[-self.reserved:] for chunk in chunks])
        return vector, rows.reshape(self.ciphertexts, self.reserved)

    def params_of(self, ciphertexts: range, params: int) -> slice:
        """Which of the `params` parameters ciphertexts `ciphertexts` carry."""
        per = self.params_per_ciphertext
        return slice(min(params, ciphertexts.start * per), min(params, ciphertexts.stop * per))

    @classmethod
    def of(cls, size: int, preset: CkksPreset) -> "Packing":
        """For `size` parameters (reals: parameters / digits per real, rounded up)."""
        digits = preset.digits_per_real
        return cls(-(-size // digits), preset.values_per_ciphertext, CHECK_VALUES, digits)


def encrypt_vector(key: SiteKey, vector: np.ndarray) -> list[bytes]:
    """Encrypt in chunks of `values_per_ciphertext`, one serialized ciphertext per chunk.

    With complex slots, values 2i and 2i+1 of a chunk are slot i's real and imaginary part.
    One ciphertext is also the natural unit to validate and sum.
    """
    preset = key.preset
    context = key.context.seal_context().data
    encoder = seal.CKKSEncoder(context)
    encryptor = seal.Encryptor(context, key.context.secret_key().data)
    slots = _to_slots(vector, preset.complex_slots)
    blobs = []
    with SealSink() as sink:
        for start in range(0, len(slots), preset.slots):
            chunk = slots[start:start + preset.slots].tolist()
            plain = seal.Plaintext()
            encoder.encode(chunk, preset.scale, plain)
            if preset.seeded:
                blob = sink.dump(encryptor.encrypt_symmetric(plain))
            else:
                ciphertext = seal.Ciphertext(context)
                encryptor.encrypt_symmetric(plain, ciphertext)
                blob = sink.dump(ciphertext)
            blobs.append(vector_bytes(blob, len(chunk), preset.scale))
    return blobs


def decrypt_vector(key: SiteKey, blobs: list[bytes], size: int) -> np.ndarray:
    """Decrypt serialized ciphertexts back into one float64 vector of `size` values."""
    preset = key.preset
    expected = chunk_sizes(size, preset.values_per_ciphertext)
    if len(blobs) != len(expected):
        raise ValueError(f"expected {len(expected)} ciphertexts for {size} values, "
                         f"got {len(blobs)}: the global was built for another layout")
    context = key.context.seal_context().data
    encoder = seal.CKKSEncoder(context)
    decryptor = seal.Decryptor(context, key.context.secret_key().data)
    out = np.empty(size, dtype=np.float64)
    start = 0
    for blob, n in zip(blobs, expected, strict=True):
        vector = ts.ckks_vector_from(key.context, blob)
        ciphertexts = vector.ciphertext()
        slots = (n + 1) // 2 if preset.complex_slots else n
        if len(ciphertexts) != 1 or vector.size() != slots:
            raise ValueError(f"a ciphertext holds {vector.size()} slots in {len(ciphertexts)} "
                             f"parts, expected {slots} in one")
        plain = seal.Plaintext()
        decryptor.decrypt(ciphertexts[0], plain)
        decoded = np.asarray(encoder.decode_complex(plain), dtype=np.complex128)
        values = decoded.view(np.float64) if preset.complex_slots else decoded.real
        out[start:start + n] = values[:n]
        start += n
    return out


def _to_slots(vector: np.ndarray, complex_slots: bool) -> np.ndarray:
    """Slot values for SEAL's encoder: the reals, or consecutive pairs as complex numbers."""
    vector = np.asarray(vector, dtype=np.float64)
    if not complex_slots:
        return vector
    return np.ascontiguousarray(np.pad(vector, (0, len(vector) % 2))).view(np.complex128)


@dataclass(frozen=True)
class _EncodeJob:
    """Ciphertexts `ciphertexts` of one update: its parameters there, unweighted."""

    values: np.ndarray
    ciphertexts: range
    weight: float
    binding: RoundBinding
    seed: int  # stochastic rounding's, drawn per ciphertext
    steps: tuple[tuple[int, int], ...] = ()  # quantized: (values, step bits) runs, in order


def _encode(key: SiteKey, job: _EncodeJob) -> list[bytes]:
    """The ciphertexts of one range: data on the preset's grid, reserved values, encrypted."""
    preset = key.preset
    packing = Packing.of(len(job.values), preset)  # a range is packed like a whole vector
    if preset.quantization is None:
        reals = fixed_point.on_grid(job.values, job.weight)
    else:
        noise = np.concatenate([np.zeros(0)] + [
            np.random.default_rng((job.seed, i)).random(len(chunk))
            for i, chunk in zip(job.ciphertexts, _chunks(job.values, packing.params_per_ciphertext),
                                strict=True)])
        counts = np.concatenate([np.zeros(0, dtype=np.int64)] + [
            packed_digits.quantize(job.values[a:b], job.weight, step_bits, noise[a:b])
            for (a, b), step_bits in _runs(job.steps)])
        reals = packed_digits.pack(counts, preset.quantization.digit_bits, preset.digits_per_real)
    return encrypt_vector(key, packing.join(reals, reserved_rows(
        preset, job.binding, job.ciphertexts, job.weight)))


def _runs(steps: tuple[tuple[int, int], ...]) -> list[tuple[tuple[int, int], int]]:
    """((start, stop), step bits) of every run of `steps`."""
    out, start = [], 0
    for length, step_bits in steps:
        out.append(((start, start + length), step_bits))
        start += length
    return out


def _steps(layout: TensorLayout, exponents: np.ndarray, params: slice) -> tuple[tuple[int, int], ...]:
    """(values, exponent) runs of the tensors covering `params`, one exponent per tensor."""
    out, start = [], 0
    for (_, shape, _), exponent in zip(layout.entries, exponents, strict=True):
        stop = start + int(np.prod(shape, dtype=np.int64))
        overlap = min(stop, params.stop) - max(start, params.start)
        if overlap > 0:
            out.append((overlap, int(exponent)))
        start = stop
    return tuple(out)


def encrypt_update(key: SiteKey, tensors: Mapping[str, np.ndarray], weight: float,
                   *, binding: RoundBinding = UNBOUND, weight_sum_bound: float = 1.0,
                   received: Mapping[str, np.ndarray] | None = None,
                   workers: int | None = None) -> ArrayRecord:
    """E(weight * tensors on the grid, weight * check values of `binding`) as an ArrayRecord.

    The data values are rounded to the preset's grid (`fixed_point`'s, or its `Quantization`
    by stochastic rounding), so the decrypted sum can be made exact; the check values are not
    (their sum s * c must come out as the site predicts it). `weight_sum_bound` bounds s = sum
    of all sites' weights (1 for the strategy's normalised a_k); the headroom check refuses
    values whose encrypted sum could overflow, a quantized preset any value beyond its range.
    `received`: the global this site decrypted this round (None in round 1), from which a
    quantized preset derives each ciphertext's range (`presets.Quantization`); every site
    must give the same one. `workers`: processes to encrypt with (None:
    `chunk_pool.default_workers()`).
    """
    preset = key.preset
    layout = TensorLayout.of(tensors)
    vector = layout.flatten(tensors)
    packing = Packing.of(len(vector), preset)
    first = header_ciphertexts(preset, layout)
    seed = zlib.crc32(vector[::SEED_STRIDE].tobytes(), zlib.crc32(repr((binding, weight)).encode()))
    if preset.quantization is None:
        _check_headroom(preset, vector, weight, weight_sum_bound)
        head: list[bytes] = []
        exponents = np.zeros(len(layout.entries), dtype=np.int64)
    else:
        header = Header(1, _range_bits(preset, layout, received), preset.quantization.level_bits)
        _check_ranges(preset, layout, vector, header.range_bits, weight, weight_sum_bound)
        reals = header.encode()
        head = encrypt_vector(key, Packing(len(reals), preset.values_per_ciphertext).join(
            reals, reserved_rows(preset, binding, range(first), weight)))
        exponents = header.level_bits - header.range_bits
    jobs = [_EncodeJob(vector[packing.params_of(r, len(vector))],
                       range(first + r.start, first + r.stop), weight, binding, seed,
                       _steps(layout, exponents, packing.params_of(r, len(vector))))
            for r in _ranges(packing.ciphertexts, workers, CALLER_OVERHEAD)]
    return ciphertexts_to_record(head + _encode_all(key, jobs))


def _range_bits(preset: CkksPreset, layout: TensorLayout,
                received: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """A quantized preset's r for every tensor, from the received global."""
    assert preset.quantization is not None
    quantization = preset.quantization
    if received is None:
        return np.full(len(layout.entries), quantization.first_bits, dtype=np.int64)
    if TensorLayout.of(received) != layout:
        raise ValueError("the received global's layout is not the update's: pass the global "
                         "this update was trained from")
    return np.array([quantization.range_bits(float(np.max(np.abs(received[name]), initial=0.0)))
                     for name, _, _ in layout.entries], dtype=np.int64)


def _chunks(vector: np.ndarray, per: int) -> list[np.ndarray]:
    """`vector` cut into ciphertexts' parameters (at least one chunk, as `Packing` counts)."""
    return [vector[i:i + per] for i in range(0, len(vector), per)] or [vector]


@dataclass(frozen=True)
class _EncodeAway:
    """An `_EncodeJob` for a worker process: its values and ciphertexts in shared memory."""

    job: _EncodeJob  # its values left empty
    values: Region
    out: Region  # ciphertext i at i * stride


def _encode_away(key: SiteKey, away: _EncodeAway) -> list[int]:
    """In a worker: `_encode`, written into `away.out`; returns the ciphertexts' lengths."""
    blobs = _encode(key, replace(away.job, values=away.values.array(np.float64)))
    out = away.out.array(np.uint8)
    stride = len(out) // len(blobs)
    for i, blob in enumerate(blobs):
        if len(blob) > stride:
            raise ValueError(f"a ciphertext of {len(blob)} bytes exceeds the {stride} reserved")
        out[i * stride:i * stride + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    return [len(blob) for blob in blobs]


def _encode_all(key: SiteKey, jobs: list[_EncodeJob]) -> list[bytes]:
    """Every job's ciphertexts in order: the first job here, the others in worker processes."""
    if len(jobs) == 1:
        return _encode(key, jobs[0])
    stride = _ciphertext_bytes(key.preset)
    sizes = [(job.values.nbytes, len(job.ciphertexts) * stride) for job in jobs[1:]]
    with shared_file(sum(a + b for a, b in sizes)) as shared:
        away, offset = [], 0
        for job, (value_bytes, out_bytes) in zip(jobs[1:], sizes, strict=True):
            shared.array(offset, value_bytes, np.float64)[:] = job.values
            away.append(_EncodeAway(replace(job, values=np.zeros(0)),
                                    shared.region(offset, value_bytes),
                                    shared.region(offset + value_bytes, out_bytes)))
            offset += value_bytes + out_bytes
        blobs, lengths = here_and_away(key, _encode, jobs[0], _encode_away, away)
        for part, sent in zip(away, lengths, strict=True):
            out = shared.array(part.out.offset, part.out.nbytes, np.uint8)
            blobs += [out[i * stride:i * stride + n].tobytes() for i, n in enumerate(sent)]
    return blobs


def _ciphertext_bytes(preset: CkksPreset) -> int:
    """An upper bound on one serialized ciphertext: 2 polynomials of 8-byte coefficients per data
    prime, plus SEAL's and TenSEAL's framing."""
    return 2 * preset.poly_modulus_degree * (len(preset.coeff_mod_bit_sizes) - 1) * 8 + 4096


def _check_headroom(preset: CkksPreset, vector: np.ndarray, weight: float,
                    weight_sum_bound: float) -> None:
    """HeadroomError unless every weighted value and every sum of them fits the preset."""
    largest = float(np.max(np.abs(vector), initial=1.0))
    preset.check_headroom(largest * max(weight_sum_bound, weight))


def _check_ranges(preset: CkksPreset, layout: TensorLayout, vector: np.ndarray,
                  range_bits: np.ndarray, weight: float, weight_sum_bound: float) -> None:
    """HeadroomError unless weights sum to at most 1 and every |w| <= 2^r of its tensor."""
    if max(weight_sum_bound, weight) > 1:
        raise HeadroomError(f"CKKS preset '{preset.name}' packs digits sized for weights summing "
                            f"to at most 1, not {max(weight_sum_bound, weight):g}: normalise a_k")
    start = 0
    for (name, shape, _), r in zip(layout.entries, range_bits, strict=True):
        stop = start + int(np.prod(shape, dtype=np.int64))
        beyond = ~(np.abs(vector[start:stop]) <= 2.0 ** int(r))  # NaN and inf too
        if beyond.any():
            raise HeadroomError(
                f"CKKS preset '{preset.name}' quantizes tensor '{name}' to |w| <= "
                f"{2.0 ** int(r):g} (from the global it received): tensor '{name}' holds "
                f"{vector[start + int(np.argmax(beyond))]:.6g}, which would wrap into the next "
                "digit; refused. Use a preset without quantization (default) for this model")
        start = stop


@dataclass(frozen=True)
class _DecodeJob:
    """A range of a global's ciphertexts, holding `params` of its parameters, summed with weight
    sum s = `weight_sum`; `checks` are the ciphertexts' indices in the global, whose check
    values' constants the range derives itself (in the worker that decrypts it)."""

    blobs: list[bytes]
    params: int
    weight_sum: float
    checks: range
    binding: RoundBinding
    steps: tuple[tuple[int, int], ...] = ()  # quantized: (values, step exponent) runs


@dataclass(frozen=True)
class _Decoded:
    """One range, decrypted and rounded to its grid (its mean written out): what
    `decrypt_global` checks."""

    reserved: np.ndarray
    constants: np.ndarray  # the check values' c of the range
    distance: fixed_point.GridDistance
    carried: int  # reals whose sum left its digits


def _decode(key: SiteKey, job: _DecodeJob, out: np.ndarray) -> _Decoded:
    """Decrypt `job`; its weighted mean (the exact grid sum / s, float64) goes into `out`."""
    preset = key.preset
    packing = Packing.of(job.params, preset)
    reals, reserved = packing.split(decrypt_vector(key, job.blobs, packing.payload_size))
    checks = (reserved / check_gain(preset),
              check_values(job.binding, len(job.checks), job.checks.start))
    if preset.quantization is None:
        sums, distance = fixed_point.nearest(reals)
        np.divide(sums, job.weight_sum, out=out)  # `fixed_point.mean`, in place
        return _Decoded(*checks, distance, 0)
    integers, distance = fixed_point.nearest(reals, grid_bits=0)
    counts, carried = packed_digits.unpack(integers, preset.quantization.digit_bits,
                                           preset.digits_per_real, job.params)
    for (a, b), exponent in _runs(job.steps):  # exact: integers times powers of two
        np.ldexp(counts[a:b].astype(np.float64), exponent, out=out[a:b])
    np.divide(out, job.weight_sum, out=out)
    return _Decoded(*checks, distance, carried)


@dataclass(frozen=True)
class _DecodeAway:
    """A `_DecodeJob` for a worker process: its ciphertexts and mean in shared memory."""

    job: _DecodeJob  # its blobs left empty
    blobs: Region  # the ciphertexts back to back
    lengths: tuple[int, ...]
    mean: Region


def _decode_away(key: SiteKey, away: _DecodeAway) -> _Decoded:
    """In a worker: `_decode`, its mean written straight into the caller's output."""
    data = away.blobs.array(np.uint8)
    starts = np.cumsum((0, *away.lengths))
    return _decode(key, replace(away.job, blobs=[data[a:b].tobytes()
                                                 for a, b in pairwise(starts)]),
                   away.mean.array(np.float64))


def _decode_all(key: SiteKey, jobs: list[_DecodeJob], layout: TensorLayout
                ) -> tuple[dict[str, np.ndarray], list[_Decoded]]:
    """The mean as `layout`'s tensors and each job's checks: the first job here, the others in
    worker processes, every one writing its part of one vector in place (in shared memory),
    so nothing is copied out or joined before the tensors are made from it."""
    params = layout.size
    if len(jobs) == 1:
        out = np.empty(params, dtype=np.float64)
        decoded = _decode(key, jobs[0], out)
        return layout.unflatten(out), [decoded]
    blob_bytes = [sum(map(len, job.blobs)) for job in jobs[1:]]
    with shared_file(params * 8 + sum(blob_bytes)) as shared:
        out = shared.array(0, params * 8, np.float64)
        away, offset, start = [], params * 8, jobs[0].params
        for job, nbytes in zip(jobs[1:], blob_bytes, strict=True):
            written = offset
            for blob in job.blobs:  # straight into shared memory: no joined copy
                shared.array(written, len(blob), np.uint8)[:] = np.frombuffer(blob, np.uint8)
                written += len(blob)
            away.append(_DecodeAway(replace(job, blobs=[]), shared.region(offset, nbytes),
                                    tuple(map(len, job.blobs)),
                                    shared.region(start * 8, job.params * 8)))
            offset, start = offset + nbytes, start + job.params
        first, rest = here_and_away(key, lambda k, j: _decode(k, j, out[:j.params]), jobs[0],
                                    _decode_away, away)
        return layout.unflatten(out), [first, *rest]  # copies: before the file is reused


def _decode_header(key: SiteKey, blobs: list[bytes], layout: TensorLayout,
                   binding: RoundBinding) -> tuple[list[_Decoded], Header | None,
                                                   IntegrityError | None]:
    """A quantized global's header ciphertexts: their check values and grid distance (as a
    `_Decoded` without data), the `Header` they sum to, or why they do not sum to one."""
    preset = key.preset
    if preset.quantization is None:
        return [], None, None
    packing = Packing(Header.reals(len(layout.entries)), preset.values_per_ciphertext)
    reals, reserved = packing.split(decrypt_vector(key, blobs, packing.payload_size))
    summed, distance = fixed_point.nearest(reals, grid_bits=0)
    decoded = _Decoded(reserved / check_gain(preset), check_values(binding, len(blobs)),
                       distance, 0)
    try:
        return [decoded], Header.decode(summed, preset, binding), None
    except IntegrityError as exc:
        return [decoded], None, exc


def decrypt_global(key: SiteKey, record: ArrayRecord, layout: TensorLayout, weight_sum: float,
                   *, binding: RoundBinding = UNBOUND, workers: int | None = None
                   ) -> dict[str, np.ndarray]:
    """Decrypt E(sum a_k w_k), verify its check values, round it to the exact grid sum and
    divide by s = sum a_k: the weighted mean, as named tensors (on `fixed_point`'s grid bit for
    bit the one a plaintext run computes). `binding` names the round whose replies were summed;
    `workers` as for `encrypt_update`.

    Raises IntegrityError when any ciphertext cannot be decrypted, its check values differ
    from s * c, it sums more updates than a quantized preset allows, or its data values lie
    off the grid.
    """
    fixed_point.check_weight_sum(weight_sum)
    preset = key.preset
    packing = Packing.of(layout.size, preset)
    first = header_ciphertexts(preset, layout)
    try:
        blobs = record_to_ciphertexts(record)
        if len(blobs) != first + packing.ciphertexts:
            raise ValueError(f"{len(blobs)} ciphertexts, the layout takes "
                             f"{first + packing.ciphertexts}")
        head, header, header_error = _decode_header(key, blobs[:first], layout, binding)
        exponents = (np.zeros(len(layout.entries), dtype=np.int64) if header is None
                     else header.range_bits - header.level_bits)
        # equal ranges: a worker copies its ciphertexts back out of shared memory, which
        # weighs as much as what the caller does alone (see chunk_pool.CALLER_OVERHEAD)
        jobs = [_DecodeJob(blobs[first + r.start:first + r.stop],
                           _count(packing.params_of(r, layout.size)), weight_sum,
                           range(first + r.start, first + r.stop), binding,
                           _steps(layout, exponents, packing.params_of(r, layout.size)))
                for r in _ranges(packing.ciphertexts, workers, 0.0)]
        tensors, decoded = _decode_all(key, jobs, layout)
        parts = [*head, *decoded]
    except (ValueError, RuntimeError, TypeError) as exc:  # TenSEAL's errors on damaged bytes
        raise IntegrityError(f"the global of round {binding.server_round} cannot be decrypted "
                             f"({exc}): it is damaged or was built for another layout") from None
    verify_checks(np.concatenate([p.reserved for p in parts]), binding, weight_sum,
                  np.concatenate([p.constants for p in parts]))
    if header_error is not None:  # after the check values, whose message says more
        raise header_error
    try:
        fixed_point.GridDistance.combine([p.distance for p in parts]).check()
    except fixed_point.OffGridError as exc:
        raise IntegrityError(f"the global of round {binding.server_round} passes its check "
                             f"values but is not a sum of grid-rounded updates ({exc}): a site "
                             "that did not round its update, or damage the check values missed"
                             ) from None
    carried = sum(p.carried for p in parts)
    if carried:
        raise IntegrityError(f"the global of round {binding.server_round} holds {carried} "
                             "values beyond its packed digits: not a sum of quantized updates")
    return tensors


def verify_checks(found: np.ndarray, binding: RoundBinding, weight_sum: float,
                  constants: np.ndarray | None = None) -> None:
    """Every decrypted check value within CHECK_TOLERANCE of s * c, or IntegrityError.
    `constants`: the c of every ciphertext, when they were derived where it was decrypted
    (`decrypt_global`'s workers); otherwise derived here."""
    if constants is None:
        constants = check_values(binding, len(found))
    deviation = np.abs(found - weight_sum * constants)
    bad = ~(deviation <= CHECK_TOLERANCE)  # NaN counts as bad
    if not bad.any():
        return
    failed = np.flatnonzero(bad.any(axis=1))
    implied = np.median(found[failed] / constants[failed])
    raise IntegrityError(
        f"the global of round {binding.server_round} fails its check values in {len(failed)} of "
        f"{len(found)} ciphertexts (first: ct-{failed[0]:05d}; largest deviation "
        f"{np.nanmax(np.where(np.isfinite(deviation), deviation, np.inf)):.3g}, tolerance "
        f"{CHECK_TOLERANCE:g}; they imply s = {implied:.6g}, the aggregator states "
        f"{weight_sum:.6g}): an update made under another secret key, damaged ciphertexts, a "
        "site that multiplied by another weight, or an update made for another round or "
        "position entered the sum")


def _count(params: slice) -> int:
    return params.stop - params.start


def _workers(workers: int | None) -> int:
    return default_workers() if workers is None else workers


def _ranges(ciphertexts: int, workers: int | None, caller_overhead: float) -> list[range]:
    """One range per worker, or a single one below MIN_PARALLEL_CIPHERTEXTS (or without
    `chunk_pool.parallel_available`); the caller's shorter by `caller_overhead`
    (`chunk_ranges.split`)."""
    parallel = ciphertexts >= MIN_PARALLEL_CIPHERTEXTS and parallel_available()
    return split(ciphertexts, _workers(workers) if parallel else 1, caller_overhead)

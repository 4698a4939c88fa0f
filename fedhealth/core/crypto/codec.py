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
says more about the cause).
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal
from flwr.app import ArrayRecord

from fedhealth.core import fixed_point
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.presets import CkksPreset
from fedhealth.core.crypto.seal_bytes import SealSink, vector_bytes
from fedhealth.core.crypto.wire import chunk_sizes, ciphertexts_to_record, record_to_ciphertexts

CHECK_VALUES = 4
"""Values reserved at the end of every ciphertext (0.1% of `default`'s 4096)."""
CHECK_TOLERANCE = 1e-6
"""Largest |decrypted - s * c| accepted. CKKS noise at scale 2^40 is ~1e-9 per value and grows
with the square root of the number of sites. A change to the sum that moves the values of a
ciphertext by less than this would go unnoticed (and is then that small)."""


class IntegrityError(ValueError):
    """A decrypted global fails its check values: it is not the sum of this round's updates."""


@dataclass(frozen=True)
class RoundBinding:
    """The training and round an update answers: its check values derive from these."""

    training_id: str
    server_round: int


UNBOUND = RoundBinding("", 0)
"""For measuring and testing the codec outside a federation run."""


def check_values(binding: RoundBinding, ciphertexts: int) -> np.ndarray:
    """The constants c, shape (ciphertexts, CHECK_VALUES): |c| in [0.5, 1), signs mixed."""
    rows = []
    for index in range(ciphertexts):
        digest = hashlib.sha256(f"fedhealth-check/1|{binding.training_id}|"
                                f"{binding.server_round}|{index}".encode()).digest()
        fraction = np.frombuffer(digest[:4 * CHECK_VALUES], dtype=">u4") / 2.0**32
        signs = np.where(np.unpackbits(np.frombuffer(digest[-1:], np.uint8))[:CHECK_VALUES], -1, 1)
        rows.append(signs * (0.5 + 0.5 * fraction))
    return np.array(rows, dtype=np.float64).reshape(ciphertexts, CHECK_VALUES)


@dataclass(frozen=True)
class Packing:
    """Where data and check values sit in the ciphertexts of a `size`-value vector."""

    size: int
    per_ciphertext: int

    @property
    def data_per_ciphertext(self) -> int:
        return self.per_ciphertext - CHECK_VALUES

    @property
    def ciphertexts(self) -> int:
        """At least one, so even an empty layout carries check values."""
        return max(1, -(-self.size // self.data_per_ciphertext))

    @property
    def payload_size(self) -> int:
        return self.size + self.ciphertexts * CHECK_VALUES

    def join(self, vector: np.ndarray, checks: np.ndarray) -> np.ndarray:
        """Data chunk i followed by its check values, for every i."""
        step = self.data_per_ciphertext
        parts = []
        for i in range(self.ciphertexts):
            parts += [vector[i * step:(i + 1) * step], checks[i]]
        return np.concatenate(parts)

    def split(self, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of `join`: (data vector, check values per ciphertext)."""
        per = self.per_ciphertext
        chunks = [payload[i * per:(i + 1) * per] for i in range(self.ciphertexts)]
        vector = np.concatenate([chunk[:-CHECK_VALUES] for chunk in chunks])
        checks = np.array([chunk[-CHECK_VALUES:] for chunk in chunks])
        return vector, checks.reshape(self.ciphertexts, CHECK_VALUES)

    @classmethod
    def of(cls, size: int, preset: CkksPreset) -> "Packing":
        return cls(size, preset.values_per_ciphertext)


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


def encrypt_update(key: SiteKey, tensors: Mapping[str, np.ndarray], weight: float,
                   *, binding: RoundBinding = UNBOUND, weight_sum_bound: float = 1.0
                   ) -> ArrayRecord:
    """E(weight * tensors on the grid, weight * check values of `binding`) as an ArrayRecord.

    The data values are rounded to `fixed_point`'s grid (so the decrypted sum can be made
    exact); the check values are not (their sum s * c must come out as the site predicts it).
    `weight_sum_bound` bounds s = sum of all sites' weights (1 for the strategy's normalised
    a_k); the headroom check refuses values whose encrypted sum could overflow.
    """
    vector = TensorLayout.of(tensors).flatten(tensors)
    largest = float(np.max(np.abs(vector), initial=1.0))
    key.preset.check_headroom(largest * max(weight_sum_bound, weight))
    packing = Packing.of(len(vector), key.preset)
    payload = packing.join(fixed_point.on_grid(vector, weight),
                           check_values(binding, packing.ciphertexts) * weight)
    return ciphertexts_to_record(encrypt_vector(key, payload))


def decrypt_global(key: SiteKey, record: ArrayRecord, layout: TensorLayout, weight_sum: float,
                   *, binding: RoundBinding = UNBOUND) -> dict[str, np.ndarray]:
    """Decrypt E(sum a_k w_k), verify its check values, round it to the exact grid sum and
    divide by s = sum a_k: the weighted mean, as named tensors, bit for bit the one a plaintext
    run computes (`fixed_point`). `binding` names the round whose replies were summed.

    Raises IntegrityError when any ciphertext cannot be decrypted, its check values differ
    from s * c, or its data values lie off the grid.
    """
    fixed_point.check_weight_sum(weight_sum)
    packing = Packing.of(layout.size, key.preset)
    try:
        payload = decrypt_vector(key, record_to_ciphertexts(record), packing.payload_size)
    except (ValueError, RuntimeError, TypeError) as exc:  # TenSEAL's errors on damaged bytes
        raise IntegrityError(f"the global of round {binding.server_round} cannot be decrypted "
                             f"({exc}): it is damaged or was built for another layout") from None
    vector, found = packing.split(payload)
    verify_checks(found, binding, weight_sum)
    try:
        summed = fixed_point.snap(vector)
    except fixed_point.OffGridError as exc:
        raise IntegrityError(f"the global of round {binding.server_round} passes its check "
                             f"values but is not a sum of grid-rounded updates ({exc}): a site "
                             "that did not round its update, or damage the check values missed"
                             ) from None
    return layout.unflatten(fixed_point.mean(summed, weight_sum))


def verify_checks(found: np.ndarray, binding: RoundBinding, weight_sum: float) -> None:
    """Every decrypted check value within CHECK_TOLERANCE of s * c, or IntegrityError."""
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

"""Site-side CKKS codec: tensors -> E(a_k w_k) ciphertexts, and E(global) -> tensors.

Sites multiply by their weight a_k in plaintext before encrypting, so the aggregator only
adds ciphertexts and never needs a multiplication level.
"""

from collections.abc import Mapping

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal
from flwr.app import ArrayRecord

from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.seal_bytes import SealSink, vector_bytes
from fedhealth.core.crypto.wire import chunk_sizes, ciphertexts_to_record, record_to_ciphertexts


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
                   *, weight_sum_bound: float = 1.0) -> ArrayRecord:
    """E(weight * tensors) as an ArrayRecord of uint8 ciphertexts.

    `weight_sum_bound` bounds s = sum of all sites' weights (1 for the strategy's normalised
    a_k); the headroom check refuses values whose encrypted sum could overflow.
    """
    vector = TensorLayout.of(tensors).flatten(tensors)
    largest = float(np.max(np.abs(vector), initial=0.0))
    key.preset.check_headroom(largest * max(weight_sum_bound, weight))
    return ciphertexts_to_record(encrypt_vector(key, vector * weight))


def decrypt_global(key: SiteKey, record: ArrayRecord, layout: TensorLayout,
                   weight_sum: float) -> dict[str, np.ndarray]:
    """Decrypt E(sum a_k w_k) and divide by s = sum a_k: the weighted mean, as named tensors."""
    if not weight_sum > 0:
        raise ValueError(f"weight sum s must be positive, got {weight_sum}")
    vector = decrypt_vector(key, record_to_ciphertexts(record), layout.size)
    return layout.unflatten(vector / weight_sum)

"""The homomorphic sum E(sum a_k w_k): the one place ciphertexts are parsed, checked and added.

Works with the params-only context: it can parse and add ciphertexts, never decrypt them.
Memory stays bounded by what a reply declares: the count of ciphertexts and each one's byte
size are checked against the expected layout before a byte is parsed, and replies are folded
into the running sum one at a time, so the peak is the sum plus one reply's parsed vectors.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import tenseal as ts
from flwr.app import ArrayRecord

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import AggregatorKey
from strategies.reply_check import ReplyRejected


@dataclass(frozen=True)
class EncryptedSum:
    """The sum of the updates that were folded in, and which ones those were."""

    ciphertexts: list[bytes] = field(repr=False)
    chunk_sizes: tuple[int, ...]  # slots used per ciphertext: the sum's layout
    included: tuple[int, ...]  # indices of the summed updates among those given


def max_ciphertext_bytes(key: AggregatorKey) -> int:
    """Bytes of an uncompressed fresh ciphertext of the key's preset, plus TenSEAL's framing."""
    preset = key.preset
    data_primes = len(preset.coeff_mod_bit_sizes) - 1
    return 2 * preset.poly_modulus_degree * data_primes * 8 + 4096


def declared_count(key: AggregatorKey, record: ArrayRecord) -> int:
    """How many ciphertexts `record` holds, from what its Arrays declare (nothing parsed)."""
    try:
        arrays = wire.ciphertext_arrays(record)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    if not arrays:
        raise ReplyRejected("no ciphertexts")
    limit = max_ciphertext_bytes(key)
    for i, array in enumerate(arrays):
        if len(array.data) > limit:
            raise ReplyRejected(f"ciphertext {i} declares {len(array.data)} bytes, a "
                                f"'{key.preset.name}' ciphertext has at most {limit}")
    return len(arrays)


def parse_ciphertexts(key: AggregatorKey, blobs: Sequence[bytes]) -> list[ts.CKKSVector]:
    """Deserialize with the params-only context and check each ciphertext can be added.

    A fresh ciphertext of this preset has 2 polynomials in NTT form at the data level, the
    preset's scale and at most N/2 slots; anything else would make the sum fail or overflow.
    """
    preset = key.preset
    data_primes = len(preset.coeff_mod_bit_sizes) - 1
    data_level = list(key.context.seal_context().data.first_parms_id())
    vectors = []
    for i, blob in enumerate(blobs):
        try:
            vector = ts.ckks_vector_from(key.context, blob)
            (ciphertext,) = vector.ciphertext()
            fresh = (ciphertext.size() == 2 and ciphertext.coeff_modulus_size() == data_primes
                     and ciphertext.scale == preset.scale and not ciphertext.is_transparent()
                     and ciphertext.is_ntt_form() and list(ciphertext.parms_id()) == data_level
                     and 0 < vector.size() <= preset.slots)
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad streams
            raise ReplyRejected(f"ciphertext {i} does not deserialize ({exc})") from None
        if not fresh:
            raise ReplyRejected(f"ciphertext {i} is not a fresh '{preset.name}' ciphertext "
                                f"(scale {ciphertext.scale:g}, {ciphertext.size()} polynomials, "
                                f"{ciphertext.coeff_modulus_size()} primes, NTT form "
                                f"{ciphertext.is_ntt_form()}, {vector.size()} slots)")
        vectors.append(vector)
    return vectors


class _RunningSum:
    """Folds one reply's ciphertexts at a time into the sum, all of them or none."""

    def __init__(self, key: AggregatorKey, expected_sizes: tuple[int, ...] | None) -> None:
        self.key = key
        self.expected_sizes = expected_sizes
        self.total: list[ts.CKKSVector] = []
        self.chunk_sizes: tuple[int, ...] = ()

    def fold(self, record: ArrayRecord) -> None:
        expected = self.chunk_sizes or self.expected_sizes
        count = declared_count(self.key, record)
        if expected is not None and count != len(expected):
            raise ReplyRejected(f"{count} ciphertexts, the federation's model takes "
                                f"{len(expected)}")
        vectors = parse_ciphertexts(self.key, wire.record_to_ciphertexts(record))
        sizes = tuple(v.size() for v in vectors)
        if expected is not None and sizes != expected:
            raise ReplyRejected(f"{sum(sizes)} slots, the federation's model takes "
                                f"{sum(expected)}")
        if not self.total:
            self.total, self.chunk_sizes = vectors, sizes  # freshly parsed: ours to add into
            return
        for i, (acc, vector) in enumerate(zip(self.total, vectors, strict=True)):
            try:
                acc.add_(vector)
            except Exception as exc:  # SEAL refuses operands it cannot add
                for done in range(i):  # take back what was added: the sum stays exact
                    self.total[done].sub_(vectors[done])
                raise ReplyRejected(f"ciphertext {i} cannot be added ({exc})") from None


def sum_updates(key: AggregatorKey, updates: Sequence[ArrayRecord], *,
                expected_sizes: tuple[int, ...] | None = None,
                on_rejected: Callable[[int, ReplyRejected], None] | None = None
                ) -> EncryptedSum | None:
    """Sum E(a_k w_k) over `updates`; None when none could be summed.

    expected_sizes: slots per ciphertext of every update (the current global's `chunk_sizes`);
        otherwise the first summable update sets them.
    on_rejected(index, error) is told of each update left out; without it, the first one
        that cannot be summed raises ReplyRejected.
    """
    running = _RunningSum(key, expected_sizes)
    included = []
    for index, record in enumerate(updates):
        try:
            running.fold(record)
        except ReplyRejected as exc:
            if on_rejected is None:
                raise
            on_rejected(index, exc)
            continue
        included.append(index)
    if not included:
        return None
    return EncryptedSum([v.serialize() for v in running.total], running.chunk_sizes,
                        tuple(included))

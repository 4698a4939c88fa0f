"""The homomorphic sum E(sum a_k w_k): the one place ciphertexts are parsed, checked and added.

Works with the params-only context: it can parse and add ciphertexts, never decrypt them.
Memory stays bounded by what a reply declares: the count of ciphertexts and each one's byte
size are checked against the expected layout before a byte is parsed, and replies are folded
into the running sum one at a time and one ciphertext at a time, so the peak is the sum, one
reply's bytes and one parsed ciphertext, whatever the number of sites.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    """Every ciphertext of `blobs` parsed and checked (`parse_ciphertext`)."""
    return [parse_ciphertext(key, blob, i) for i, blob in enumerate(blobs)]


def parse_ciphertext(key: AggregatorKey, blob: bytes, index: int) -> ts.CKKSVector:
    """Deserialize ciphertext `index` with the params-only context and check it can be added.

    A fresh ciphertext of this preset has 2 polynomials in NTT form at the data level, the
    preset's scale and at most N/2 slots; anything else would make the sum fail or overflow.
    """
    preset = key.preset
    data_primes = len(preset.coeff_mod_bit_sizes) - 1
    try:
        vector = ts.ckks_vector_from(key.context, blob)
        (ciphertext,) = vector.ciphertext()
        fresh = (ciphertext.size() == 2 and ciphertext.coeff_modulus_size() == data_primes
                 and ciphertext.scale == preset.scale and not ciphertext.is_transparent()
                 and ciphertext.is_ntt_form()
                 and list(ciphertext.parms_id()) == _data_level(key)
                 and 0 < vector.size() <= preset.slots)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad streams
        raise ReplyRejected(f"ciphertext {index} does not deserialize ({exc})") from None
    if not fresh:
        raise ReplyRejected(f"ciphertext {index} is not a fresh '{preset.name}' ciphertext "
                            f"(scale {ciphertext.scale:g}, {ciphertext.size()} polynomials, "
                            f"{ciphertext.coeff_modulus_size()} primes, NTT form "
                            f"{ciphertext.is_ntt_form()}, {vector.size()} slots)")
    return vector


def _data_level(key: AggregatorKey) -> list[int]:
    """The parms id of the key's data level, which every fresh ciphertext is at."""
    return list(key.context.seal_context().data.first_parms_id())


class UpdateSum(Protocol):
    """What a round folds replies into: `RunningSum` here, `strategies.parallel_sum.ParallelSum`
    over worker processes."""

    @property
    def chunk_sizes(self) -> tuple[int, ...]: ...

    def fold(self, record: ArrayRecord) -> None: ...

    def ciphertexts(self) -> list[bytes]: ...


class RunningSum:
    """E(sum a_k w_k) over the updates folded so far: each one all or nothing, then released.

    `fold` parses and adds one ciphertext at a time, so while a reply is folded the memory is
    the sum, the reply's bytes and one parsed ciphertext; a ciphertext that fails takes back
    the ones of that reply already added (re-parsed from the reply's bytes), so the sum stays
    exact and the reply is left out whole. `first_index`: the index of this sum's first
    ciphertext in the model, when it holds a slice of it (a worker of `ParallelSum`).
    """

    def __init__(self, key: AggregatorKey, expected_sizes: tuple[int, ...] | None,
                 first_index: int = 0) -> None:
        self.key = key
        self.expected_sizes = expected_sizes
        self.first_index = first_index
        self.total: list[ts.CKKSVector] = []
        self.chunk_sizes: tuple[int, ...] = ()

    def fold(self, record: ArrayRecord) -> None:
        """Add one update; ReplyRejected (and the sum unchanged) if it cannot be summed."""
        check_count(declared_count(self.key, record), self.chunk_sizes or self.expected_sizes)
        self.fold_ciphertexts(wire.record_to_ciphertexts(record))

    def fold_ciphertexts(self, blobs: Sequence[bytes]) -> None:
        """`fold` for serialized ciphertexts whose count was checked."""
        if not self.total:  # the first update is parsed whole: it becomes the sum
            vectors = [parse_ciphertext(self.key, blob, self.first_index + i)
                       for i, blob in enumerate(blobs)]
            sizes = tuple(v.size() for v in vectors)
            check_sizes(sizes, self.expected_sizes)
            self.total, self.chunk_sizes = vectors, sizes
            return
        for i, blob in enumerate(blobs):
            index = self.first_index + i
            try:
                vector = parse_ciphertext(self.key, blob, index)
                if vector.size() != self.chunk_sizes[i]:
                    raise ReplyRejected(f"ciphertext {index} holds {vector.size()} slots, the "
                                        f"federation's model puts {self.chunk_sizes[i]} there")
                self.total[i].add_(vector)
            except ReplyRejected:
                self.take_back(blobs[:i])
                raise
            except Exception as exc:  # SEAL refuses operands it cannot add
                self.take_back(blobs[:i])
                raise ReplyRejected(f"ciphertext {index} cannot be added ({exc})") from None

    def take_back(self, blobs: Sequence[bytes]) -> None:
        """Subtract ciphertexts that were added (the first `len(blobs)` of the sum)."""
        for acc, blob in zip(self.total, blobs, strict=False):
            acc.sub_(ts.ckks_vector_from(self.key.context, blob))  # checked when added

    def ciphertexts(self) -> list[bytes]:
        """The sum serialized, releasing each parsed ciphertext as soon as its bytes exist."""
        blobs = []
        self.total.reverse()
        while self.total:
            blobs.append(self.total.pop().serialize())
        return blobs


def check_count(count: int, expected: tuple[int, ...] | None) -> None:
    """A reply's declared ciphertext count against the sum's layout (None: not fixed yet)."""
    if expected is not None and count != len(expected):
        raise ReplyRejected(f"{count} ciphertexts, the federation's model takes {len(expected)}")


def check_sizes(sizes: tuple[int, ...] | None, expected: tuple[int, ...] | None) -> None:
    """Slots per ciphertext against the sum's layout (either None: nothing to compare)."""
    if sizes is not None and expected is not None and sizes != expected:
        raise ReplyRejected(f"{sum(sizes)} slots, the federation's model takes {sum(expected)}")


def sum_updates(key: AggregatorKey, updates: Iterable[ArrayRecord], *,
                expected_sizes: tuple[int, ...] | None = None,
                on_rejected: Callable[[int, ReplyRejected], None] | None = None
                ) -> EncryptedSum | None:
    """Sum E(a_k w_k) over `updates`, folding each as it comes; None when none could be summed.

    expected_sizes: slots per ciphertext of every update (the current global's `chunk_sizes`);
        otherwise the first summable update sets them.
    on_rejected(index, error) is told of each update left out; without it, the first one
        that cannot be summed raises ReplyRejected.
    """
    running = RunningSum(key, expected_sizes)
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
    return EncryptedSum(running.ciphertexts(), running.chunk_sizes, tuple(included))

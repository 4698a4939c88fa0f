"""A deterministic flat layout for a dict of tensors, and its hash.

Sites and the aggregator compare layout hashes instead of shapes: the aggregator never sees
the tensors, only that every site packed the same names, shapes and dtypes in the same order.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorLayout:
    """Names, shapes and dtypes of a tensor dict, in the order given."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> "TensorLayout":
        return cls(tuple((name, tuple(np.shape(t)), np.asarray(t).dtype.str)
                         for name, t in tensors.items()))

    @property
    def hash(self) -> str:
        """sha256 over the JSON of (name, shape, dtype) triples."""
        text = json.dumps([list(e) for e in self.entries], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def size(self) -> int:
        """Number of scalar values once flattened."""
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.entries)

    def name_at(self, index: int) -> str:
        """The tensor that value `index` of the flat vector belongs to (for error messages)."""
        stop = 0
        for name, shape, _ in self.entries:
            stop += int(np.prod(shape, dtype=np.int64))
            if index < stop:
                return name
        raise IndexError(f"value {index} is beyond the layout's {self.size} values")

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float64 vector in layout order; refuses tensors that do not match the layout."""
        found = TensorLayout.of(tensors)
        if found != self:
            raise ValueError(
                f"tensors do not match the layout (layout {self.hash[:12]}, got {found.hash[:12]}): "
                "the same names, shapes and dtypes must be given in the same order"
            )
        if not self.entries:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate(
            [np.asarray(tensors[name], dtype=np.float64).ravel() for name, _, _ in self.entries]
        )

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Back to named tensors with their shapes and dtypes (integers are rounded)."""
        vector = np.asarray(vector)
        if vector.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} values, got shape {vector.shape}")
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, shape, dtype_str in self.entries:
            dtype = np.dtype(dtype_str)
            stop = start + int(np.prod(shape, dtype=np.int64))
            part = vector[start:stop].reshape(shape)
            if dtype.kind in "iub":
                part = np.rint(part)
            out[name] = part.astype(dtype)
            start = stop
        return out

"""Contiguous ranges of ciphertext indices, one per process: how a site's codec and the
aggregator's parallel sum divide their work.

Key-free on purpose: the aggregator (`strategies/`) may import it, and nothing here can reach a
secret key.
"""

from itertools import pairwise

import numpy as np


def split(count: int, parts: int, caller_overhead: float = 0.0) -> list[range]:
    """`count` ciphertext indices in `parts` contiguous ranges (none empty): the first, which
    the calling process runs, shorter by `caller_overhead` of the whole work, spread over the
    others, so that every process has the same work; equal ranges when that would empty one."""
    parts = max(1, min(parts, count))
    weights = np.array([max(0.5, 1 - (parts - 1) * caller_overhead)]
                       + [1 + caller_overhead] * (parts - 1))
    bounds = [0, *np.rint(count * np.cumsum(weights) / weights.sum()).astype(int).tolist()]
    if any(b <= a for a, b in pairwise(bounds)):
        bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in pairwise(bounds)]

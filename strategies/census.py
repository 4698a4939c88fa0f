"""Site weights a_k: uniform, or from a census of training sample counts with a coordinator's cap.

Counts come from checked census replies (1..`MAX_NUM_EXAMPLES`), asked once per node. The cap
bounds each site's share of the global, whatever it claims: a_k = min(n_k / sum n, cap) with the
excess spread over the uncapped sites in proportion to their counts (water-filling), so the
weights still sum to 1.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field


def uniform_weights(nodes: Sequence[int]) -> dict[int, float]:
    """a_k = 1/K over the sampled nodes, for sites that keep their counts private."""
    return dict.fromkeys(nodes, 1.0 / len(nodes)) if nodes else {}


def capped_shares(counts: dict[int, int], cap: float) -> dict[int, float]:
    """Shares proportional to `counts`, none above `cap`, summing to 1.

    When `cap` times the number of sites is below 1 no such shares exist; every site then gets
    1/K, the closest to the cap that still sums to 1.
    """
    if not counts:
        return {}
    if cap * len(counts) <= 1.0:
        return uniform_weights(list(counts))
    shares: dict[int, float] = {}
    free = dict(counts)
    left = 1.0
    while free:
        total = sum(free.values())
        over = {n for n, c in free.items() if left * c / total > cap}
        if not over:
            shares.update({n: left * c / total for n, c in free.items()})
            break
        for node in over:
            shares[node] = cap
            left -= cap
            del free[node]
    return shares


@dataclass
class Census:
    """Training sample counts by node, and the capped weights they give."""

    max_site_weight: float = 1.0
    counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.max_site_weight <= 1.0:
            raise ValueError(f"max-site-weight must be in (0, 1], got {self.max_site_weight}")

    def unknown(self, nodes: Sequence[int]) -> list[int]:
        """The nodes to ask: those without a counted reply yet."""
        return [n for n in nodes if n not in self.counts]

    def count(self, node_id: int, num_examples: int) -> None:
        self.counts[node_id] = num_examples

    def weights(self, nodes: Sequence[int]) -> dict[int, float]:
        """a_k for the counted nodes among `nodes`; an uncounted node sits the round out."""
        return capped_shares({n: self.counts[n] for n in nodes if n in self.counts},
                             self.max_site_weight)

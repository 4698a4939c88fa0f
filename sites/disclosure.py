"""What a site's replies reveal about its data besides the encrypted update, and the knob on it.

Plaintext metrics and counts leave the site every round. On a small test split they say more than
they seem to: accuracy = (TP + TN) / n and balanced accuracy = (TP / P + TN / N) / 2 with the
evaluate reply's n = P + N can be solved for the class counts P and N, and `num-examples` is each
split's exact size. A site limits this with its settings: round metrics, withhold some, report
counts only to a step (see the README's threat model).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedhealth.core.crypto.wire import NUM_EXAMPLES as COUNT


class DisclosureError(ValueError):
    """A disclosure setting that cannot be applied."""


@dataclass(frozen=True)
class MetricDisclosure:
    """decimals: round every metric to this many decimals (None: full precision);
    withheld: metric names never sent; count_step: counts are sent rounded up to a multiple of it
    (1: exact). The defaults send everything exactly, as before the knob existed."""

    decimals: int | None = None
    withheld: frozenset[str] = field(default_factory=frozenset)
    count_step: int = 1

    def __post_init__(self) -> None:
        if self.decimals is not None and not 0 <= self.decimals <= 15:
            raise DisclosureError(f"metric-decimals must be 0..15, got {self.decimals}")
        if COUNT in self.withheld:
            raise DisclosureError(f"withhold-metrics cannot name '{COUNT}': every reply must carry "
                                  "it (weights, means); use count-step to coarsen it")
        if self.count_step < 1:
            raise DisclosureError(f"count-step must be a positive integer, got {self.count_step}")

    def metrics(self, values: Mapping[str, float]) -> dict[str, float]:
        """The metrics as this site reports them."""
        kept = {k: float(v) for k, v in values.items() if k not in self.withheld}
        if self.decimals is None:
            return kept
        return {k: round(v, self.decimals) if math.isfinite(v) else v for k, v in kept.items()}

    def count(self, n: int) -> int:
        """A sample count as this site reports it (0 stays 0)."""
        return -(-n // self.count_step) * self.count_step

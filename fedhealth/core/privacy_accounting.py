"""Epsilon at a stated delta for a sequence of Gaussian releases: Opacus's RDP accountant.

Both sides need the same figure: the ServerApp reports the federation's client-level epsilon
round by round (results.json, its log), and every site keeps its own ledger of what it released
(its audit log, its `max-epsilon` budget). No accountant is written here: Opacus's
`RDPAccountant` composes the releases (Mironov 2017; its Poisson-subsampled Gaussian analysis
for DP-SGD) and converts to (epsilon, delta); this module only states what a release is.

A client-level round is one Gaussian release with sampling rate 1: every sampled site's clipped
update enters the sum (Flower's sampling without replacement is not the Poisson sampling the
amplification bound assumes, so none is claimed). A DP-SGD round at a site is `steps` releases
of the Poisson-subsampled Gaussian at the batch's sampling rate.
"""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GaussianRelease:
    """`steps` compositions of the Gaussian mechanism with noise multiplier `noise_multiplier`
    (noise sd / L2 sensitivity), each on a Poisson sample of rate `sample_rate`."""

    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"a Gaussian release needs a noise multiplier > 0, got "
                             f"{self.noise_multiplier}: without noise there is no epsilon")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"a release has at least one step, got {self.steps}")


def epsilon(releases: Sequence[GaussianRelease], delta: float) -> float:
    """Epsilon at `delta` after composing every release (0 for none), by Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant  # loads torch: only when a figure is asked for

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not releases:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in releases]
    return float(accountant.get_epsilon(delta))


def epsilon_by_round(releases: Sequence[GaussianRelease], delta: float) -> list[float]:
    """Epsilon after each release in turn: the i-th value composes releases[0..i]."""
    return [epsilon(releases[:i + 1], delta) for i in range(len(releases))]

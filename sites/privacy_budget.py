"""A site's own account of what it released in a training, and its refusal to exceed its budget.

The aggregator reports an epsilon too, but a site does not have to trust it: every DP release a
site makes (a round's clipped, noised update; a round of DP-SGD) is written to its ledger
(`<state-dir>/privacy/<site>/run-<training id>.json`) before the reply leaves, and before it
trains a round it composes the ledger with the round it is asked for (Opacus's RDP accountant,
`fedhealth.core.privacy_accounting`). If that would take its epsilon past its own `max-epsilon`
(site.toml `[site]`), it refuses the round: the reply is an error (`privacy-budget`), which the
aggregator counts as a failed site; nothing is trained or sent.

The site's epsilon is the strongest guarantee it holds: the client-level epsilon when the run
adds client-level noise (it bounds everything the site's data can do to what it sends, each
patient included), else DP-SGD's sample-level one. A site with a budget refuses a run without
either: its epsilon would be unbounded. The ledger assumes every site's noise share reached the
sum; a round in which sites dropped out carried less noise (the ServerApp's figure counts that).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedhealth.core.atomic_file import write_atomically
from fedhealth.core.privacy_accounting import GaussianRelease, epsilon

CLIENT, SAMPLE = "client", "sample"  # client-level (update) and sample-level (DP-SGD) releases
LEDGER_DIR = "privacy"


class PrivacyBudgetExceeded(RuntimeError):
    """Training the round asked for would take this site past its `max-epsilon`."""


@dataclass(frozen=True)
class SiteEpsilon:
    """A site's epsilon at `delta` over one training: client-level and sample-level (None where
    the run has no such noise), and the one its budget is held to."""

    client: float | None
    sample: float | None
    delta: float

    @property
    def guarantee(self) -> float:
        """The strongest bound the site holds (inf without any DP)."""
        return next((e for e in (self.client, self.sample) if e is not None), float("inf"))

    def to_json(self) -> dict[str, float | None]:
        return {"epsilon": self.client, "sample_epsilon": self.sample, "delta": self.delta}


@dataclass(frozen=True)
class LedgerEntry:
    """One round's release at this site."""

    server_round: int
    kind: str  # CLIENT or SAMPLE
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def release(self) -> GaussianRelease:
        return GaussianRelease(self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """The releases one site made in one training, kept in its state folder."""

    def __init__(self, state_dir: Path, site: str, training: str) -> None:
        self.path = Path(state_dir) / LEDGER_DIR / site / f"run-{training}.json"

    def entries(self) -> list[LedgerEntry]:
        if not self.path.is_file():
            return []
        try:
            return [LedgerEntry(**e) for e in json.loads(self.path.read_text())["releases"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the privacy ledger {self.path} is damaged ({exc!r}): restore it "
                             "from a backup; without it this site cannot tell what it already "
                             "released in this training") from None

    def epsilon(self, delta: float, planned: list[LedgerEntry] | None = None) -> SiteEpsilon:
        """This site's epsilon after its recorded releases and `planned` ones."""
        entries = [*self.entries(), *(planned or [])]

        def of(kind: str) -> float | None:
            releases = [e.release for e in entries if e.kind == kind]
            return epsilon(releases, delta) if releases else None

        return SiteEpsilon(of(CLIENT), of(SAMPLE), delta)

    def record(self, new: list[LedgerEntry]) -> None:
        """Append a round's releases (every release counts, a repeated round's too)."""
        entries = [*self.entries(), *new]
        payload = {"releases": [asdict(e) for e in entries]}
        write_atomically(self.path, json.dumps(payload, indent=1).encode(), overwrite=True)


def check_budget(ledger: PrivacyLedger, planned: list[LedgerEntry], max_epsilon: float | None,
                 delta: float, site: str) -> SiteEpsilon:
    """The site's epsilon once `planned` is released; PrivacyBudgetExceeded past `max_epsilon`."""
    after = ledger.epsilon(delta, planned)
    if max_epsilon is not None and not after.guarantee <= max_epsilon:
        before = ledger.epsilon(delta).guarantee
        why = ("the run adds no differential-privacy noise (dp-noise-multiplier and "
               "dp-sgd-noise-multiplier are 0)" if after.guarantee == float("inf") else
               f"this round would take its epsilon from {before:.3g} to {after.guarantee:.3g} "
               f"at delta {delta:g}")
        raise PrivacyBudgetExceeded(
            f"site {site} refuses to train: its budget is max-epsilon = {max_epsilon:g} "
            f"(site.toml [site]) and {why}; it sends no update for this training")
    return after

"""The one record of a federation run: per site and round, what the aggregator accepted or refused.

Flower's strategies only keep weighted means; a researcher needs each hospital's numbers, and a
coordinator needs to know who was excluded and why. The strategy fills one `RunHistory` with
validated records only (site from the reply's checked `fh.crypto` record, round from the
aggregator's own count); the same object is checkpointed beside E(global) and becomes
results.json, so there is no second copy to disagree with.
"""

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType

from fedhealth.core.atomic_file import write_atomically

# dice: segmentation
EVALUATION_METRICS = ("accuracy", "balanced_accuracy", "balanced_accuracy_se", "auc", "dice")
TRAIN, EVALUATE = "train", "evaluate"  # the kinds of round a site reports on
KINDS = (TRAIN, EVALUATE)


@dataclass(frozen=True)
class SiteRecord:
    """One site's accepted reply in one round: checked counts and finite scalar metrics."""

    site: str
    num_examples: int
    metrics: Mapping[str, float]
    uplink_bytes: int = 0
    refused_global: int = 0  # the round of a global whose check values failed at the site, or 0

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in self.metrics.values()):
            raise ValueError(f"site {self.site}: metrics must be finite, got {dict(self.metrics)}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def to_json(self) -> dict[str, object]:
        return {"site": self.site, "num_examples": self.num_examples,
                "metrics": dict(self.metrics), "uplink_bytes": self.uplink_bytes,
                "refused_global": self.refused_global}


@dataclass(frozen=True)
class Rejection:
    """A reply the aggregator refused, and why; `site` is None when the reply named none."""

    kind: str
    server_round: int
    node_id: int
    site: str | None
    reason: str


@dataclass
class RunHistory:
    """Accepted records by kind, round and site; rejections in the order they happened."""

    records: dict[str, dict[int, dict[str, SiteRecord]]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS})
    rejections: list[Rejection] = field(default_factory=list)
    evaluated_at: dict[int, float] = field(default_factory=dict)  # this process's rounds only

    def record(self, kind: str, server_round: int, record: SiteRecord) -> None:
        """Keep `record`; a second record for the same site and round is a bug in the caller."""
        sites = self.records[kind].setdefault(server_round, {})
        if record.site in sites:
            raise ValueError(f"round {server_round} {kind}: site {record.site} is already recorded")
        sites[record.site] = record
        if kind == EVALUATE:
            self.evaluated_at[server_round] = time.perf_counter()

    def reject(self, rejection: Rejection) -> None:
        self.rejections.append(rejection)

    def round_closed(self, kind: str, server_round: int) -> None:
        """Mark a round as done even when no site was accepted (it then shows as empty)."""
        self.records[kind].setdefault(server_round, {})
        if kind == EVALUATE:
            self.evaluated_at.setdefault(server_round, time.perf_counter())

    def sites(self, kind: str, server_round: int) -> dict[str, SiteRecord]:
        return dict(self.records[kind].get(server_round, {}))

    def final_per_site(self) -> dict[str, dict[str, float]]:
        """Each site's evaluation metrics from the last round it was evaluated in."""
        latest: dict[str, SiteRecord] = {}
        for server_round in sorted(self.records[EVALUATE]):
            latest.update(self.records[EVALUATE][server_round])
        return {site: {k: latest[site].metrics[k] for k in EVALUATION_METRICS
                       if k in latest[site].metrics} for site in sorted(latest)}

    def round_seconds(self) -> dict[int, float]:
        """Wall time of each round (train + evaluate), from one evaluation to the next."""
        rounds = sorted(self.evaluated_at)
        return {r: self.evaluated_at[r] - self.evaluated_at[p] for p, r in pairwise(rounds)}

    def refused_globals(self) -> list[dict[str, object]]:
        """Every reply that said its site refused a global: which round's, when, and who."""
        return [{"kind": kind, "round": r, "site": s, "refused_global": rec.refused_global}
                for kind, rounds in self.records.items() for r, sites in sorted(rounds.items())
                for s, rec in sorted(sites.items()) if rec.refused_global]

    def uplink_bytes_per_round(self) -> float:
        """Mean bytes the accepted train replies of a round carried, over rounds that had any."""
        totals = [sum(r.uplink_bytes for r in sites.values())
                  for sites in self.records[TRAIN].values()]
        totals = [t for t in totals if t]
        return sum(totals) / len(totals) if totals else 0

    # ------------------------------------------------------------- JSON
    def by_round_json(self, kind: str) -> dict[str, dict[str, dict[str, float]]]:
        """`{round: {site: metrics}}` with string keys, as results.json has it."""
        return {str(r): {s: dict(rec.metrics) for s, rec in sorted(sites.items())}
                for r, sites in sorted(self.records[kind].items())}

    def to_json(self) -> dict[str, object]:
        """What a checkpoint keeps, and what `from_json` reads back: every record and rejection."""
        return {
            kind: {str(r): {s: rec.to_json() for s, rec in sites.items()}
                   for r, sites in rounds.items()}
            for kind, rounds in self.records.items()
        } | {"rejected": [asdict(r) for r in self.rejections]}

    @classmethod
    def from_json(cls, data: Mapping[str, object], source: str) -> "RunHistory":
        """The inverse of `to_json`; a malformed history names `source` (usually its file)."""
        history = cls()
        try:
            for kind in KINDS:
                rounds = data.get(kind, {})
                assert isinstance(rounds, dict)
                for server_round, sites in rounds.items():
                    for record in sites.values():
                        history.records[kind].setdefault(int(server_round), {})
                        history.records[kind][int(server_round)][record["site"]] = SiteRecord(
                            **record)
            rejected = data.get("rejected", [])
            assert isinstance(rejected, list)
            history.rejections = [Rejection(**r) for r in rejected]
        except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: the run history is damaged ({exc!r}); move the "
                             "checkpoint folder away to start a new run") from None
        return history


@dataclass(frozen=True)
class RunResults:
    """What results.json holds: the run's settings, per-site metrics by round, timing and bytes."""

    strategy: str
    encrypted: bool
    rounds: int
    seconds: float
    history: RunHistory = field(repr=False)

    def to_json(self) -> dict[str, object]:
        per_site = self.history.final_per_site()
        return {
            "strategy": self.strategy, "encrypted": self.encrypted, "rounds": self.rounds,
            "seconds": self.seconds,
            "per_site": per_site,
            "mean": mean_metrics(per_site),
            "evaluate_by_round": self.history.by_round_json(EVALUATE),
            "train_by_round": self.history.by_round_json(TRAIN),
            "rejected": [asdict(r) for r in self.history.rejections],
            "refused_globals": self.history.refused_globals(),
            "round_seconds": {str(r): t for r, t in self.history.round_seconds().items()},
            "uplink_bytes_per_round": self.history.uplink_bytes_per_round(),
        }


def mean_metrics(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over sites: every hospital counts once, whatever its size."""
    if not per_site:
        return {}
    keys = [k for k in EVALUATION_METRICS if all(k in m for m in per_site.values())]
    return {k: sum(m[k] for m in per_site.values()) / len(per_site) for k in keys}


def write_json_atomically(path: Path, payload: object) -> None:
    """Write strict JSON (no NaN) so a reader never sees half a file, even if the process dies."""
    write_atomically(path, json.dumps(payload, indent=2, sort_keys=True,
                                      allow_nan=False).encode())

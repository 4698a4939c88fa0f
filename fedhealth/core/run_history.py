"""What a federation run leaves behind: per-site metrics by round and uplink bytes.

Flower's strategies only keep weighted means; a researcher needs each hospital's numbers.
`RunHistory` plugs into a strategy as its metrics-aggregation function, so the same history
is kept whether the strategy is Flower's FedAvg or our encrypted one.
"""

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedhealth.core.atomic_file import write_atomically

SITE_RECORD = "site"
"""Name of the ConfigRecord every site reply carries: {"name": str, "server-round": int}."""

SiteMetrics = dict[str, dict[str, float]]  # site name -> metric name -> value

EVALUATION_METRICS = ("accuracy", "balanced_accuracy", "auc", "dice")  # dice: segmentation


def site_of(content: RecordDict) -> tuple[str, int]:
    """The (site name, server round) a reply says it answers."""
    record = content[SITE_RECORD]
    return str(record["name"]), int(record["server-round"])  # type: ignore[arg-type]


def _metrics_of(content: RecordDict) -> dict[str, float]:
    metrics = next(iter(content.metric_records.values()))
    return {key: float(value) for key, value in metrics.items()}  # type: ignore[arg-type]


def _uplink_bytes(content: RecordDict) -> int:
    return sum(array.numpy().nbytes for record in content.array_records.values()
               for array in record.values())


@dataclass
class RunHistory:
    """Per-round, per-site metrics and uplink bytes, filled in by a strategy's aggregation hooks."""

    evaluate: dict[int, SiteMetrics] = field(
        default_factory=lambda: defaultdict(dict))
    train: dict[int, SiteMetrics] = field(
        default_factory=lambda: defaultdict(dict))
    uplink_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    evaluated_at: dict[int, float] = field(default_factory=dict)

    def aggregate_train(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Record each site's training metrics and bytes sent, then take the weighted mean."""
        for content in replies:
            site, server_round = site_of(content)
            self.train[server_round][site] = _metrics_of(content)
            self.uplink_bytes[server_round] += _uplink_bytes(content)
        return aggregate_metricrecords(replies, weight_key)

    def aggregate_evaluate(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Record each site's evaluation metrics, then take the weighted mean."""
        for content in replies:
            site, server_round = site_of(content)
            self.evaluate[server_round][site] = _metrics_of(content)
            self.evaluated_at[server_round] = time.perf_counter()
        return aggregate_metricrecords(replies, weight_key)

    def restore(self, train: dict[int, SiteMetrics], evaluate: dict[int, SiteMetrics]) -> None:
        """Add the rounds a resumed run finished before its restart (their timing is not kept)."""
        for server_round, sites in train.items():
            self.train[server_round].update(sites)
        for server_round, sites in evaluate.items():
            self.evaluate[server_round].update(sites)

    def final_per_site(self) -> dict[str, dict[str, float]]:
        """Each site's metrics from the last round it was evaluated in."""
        latest: dict[str, dict[str, float]] = {}
        for server_round in sorted(self.evaluate):
            latest.update(self.evaluate[server_round])
        return {site: {k: latest[site][k] for k in EVALUATION_METRICS if k in latest[site]}
                for site in sorted(latest)}

    def round_seconds(self) -> dict[int, float]:
        """Wall time of each round (train + evaluate), from one evaluation to the next."""
        rounds = sorted(self.evaluated_at)
        return {r: self.evaluated_at[r] - self.evaluated_at[p] for p, r in pairwise(rounds)}

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary: per-site metrics by round, final per-site and mean metrics."""
        per_site = self.final_per_site()
        rounds_with_uplink = [n for n in self.uplink_bytes.values() if n]
        return {
            "per_site": per_site,
            "mean": mean_metrics(per_site),
            "evaluate_by_round": {str(r): dict(v) for r, v in sorted(self.evaluate.items())},
            "train_by_round": {str(r): dict(v) for r, v in sorted(self.train.items())},
            "round_seconds": {str(r): t for r, t in self.round_seconds().items()},
            "uplink_bytes_per_round": (sum(rounds_with_uplink) / len(rounds_with_uplink)
                                       if rounds_with_uplink else 0),
        }


def mean_metrics(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over sites: every hospital counts once, whatever its size."""
    if not per_site:
        return {}
    keys = [k for k in EVALUATION_METRICS if all(k in m for m in per_site.values())]
    return {k: sum(m[k] for m in per_site.values()) / len(per_site) for k in keys}


def write_json_atomically(path: Path, payload: object) -> None:
    """Write JSON so a reader never sees half a file, even if the process dies mid-write."""
    write_atomically(path, json.dumps(payload, indent=2, sort_keys=True).encode())

"""What a comparison shows: per strategy and site, the mean over seeds with its 95% interval.

Two kinds of uncertainty, reported apart:
- `ci95`: test-set luck. Each site reports the bootstrap standard error of its balanced accuracy
  over its own test images (`sites.training.bootstrap_se`); seeds and sites are independent
  samples, so standard errors of a mean over them combine in quadrature.
- `seed_sd`: the spread over seeds (`--repeats`), which also moves the patient split, the
  initial model and the shuffles.
`rounds_to_target` is the first round at which a federated run's mean over sites reaches a stated
fraction of pooled training's: with the uplink to that round, what a coordinator plans with.
`encryption_gap` is what encryption costs in accuracy: the largest difference, over sites and
seeds, between a strategy's encrypted run and its plaintext run on the same seed.
`epsilon` is the client-level privacy a run spent (results.json `privacy`, at its `delta`); runs
at different noise multipliers are different rows.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import mean, stdev
from typing import cast

METRIC = "balanced_accuracy"
STANDARD_ERROR = f"{METRIC}_se"
Z95 = 1.959964  # two-sided 95% normal quantile
TARGET_FRACTION = 0.9

Run = Mapping[str, object]


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% half-width from test-image bootstrap, and the sd over seeds."""

    mean: float
    ci95: float
    seed_sd: float | None  # None with a single seed

    @classmethod
    def of(cls, values: Sequence[float], standard_errors: Sequence[float]) -> "Estimate":
        """The mean of independent estimates (seeds, sites) with their combined interval."""
        se = math.sqrt(sum(e * e for e in standard_errors)) / len(standard_errors)
        return cls(mean(values), Z95 * se, stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class StrategySummary:
    """One row of the comparison: a strategy in one mode over every seed it ran with."""

    label: str
    strategy: str
    encrypted: bool | None
    seeds: int
    per_site: dict[str, Estimate]
    mean: Estimate  # over sites (every hospital counts once)
    worst_site: str
    auc: float
    curve: dict[int, float]  # mean over sites and seeds, by round (federated runs)
    rounds_to_target: float | None  # mean over the seeds that reached it
    uplink_bytes_to_target: float | None
    seconds: float
    uplink_bytes_per_round: float
    noise_multiplier: float = 0.0  # client-level DP (0: none)
    epsilon: float | None = None  # mean over the seeds' runs; None without client-level DP
    delta: float | None = None

    def to_json(self) -> dict[str, object]:
        payload = asdict(self)
        payload["curve"] = {str(r): v for r, v in self.curve.items()}
        return payload


def run_label(run: Run) -> str:
    """'fedbn (encrypted)', 'fedavg (plaintext)', 'fedavg (encrypted, DP z=0.5)', or just
    'local' for non-federated baselines."""
    mode = run.get("encrypted")
    if mode is None:
        return str(run["strategy"])
    noise = noise_multiplier(run)
    privacy = f", DP z={noise:g}" if noise > 0 else ""
    return f"{run['strategy']} ({'encrypted' if mode else 'plaintext'}{privacy})"


def noise_multiplier(run: Run) -> float:
    """The client-level DP noise multiplier a run used (0: none, or a baseline)."""
    privacy = cast(Mapping[str, object], run.get("privacy") or {})
    return _number(privacy.get("noise_multiplier"))


def run_epsilon(run: Run) -> float | None:
    """The client-level epsilon a run spent, None without client-level DP."""
    privacy = cast(Mapping[str, object], run.get("privacy") or {})
    value = privacy.get("epsilon")
    return None if value is None or not noise_multiplier(run) else _number(value)


def rounds_to_target(curve: Mapping[int, float], target: float) -> int | None:
    """The first round (>= 1) whose value reaches `target`, or None if none does."""
    return next((r for r in sorted(curve) if r >= 1 and curve[r] >= target), None)


def site_curve(run: Run) -> dict[int, float]:
    """Mean of `METRIC` over the sites evaluated in each round of a federated run."""
    rounds = cast(Mapping[str, Mapping[str, Mapping[str, float]]],
                  run.get("evaluate_by_round") or {})
    return {int(r): mean(m[METRIC] for m in sites.values())
            for r, sites in rounds.items() if sites and all(METRIC in m for m in sites.values())}


def add_rounds_to_target(runs: Sequence[dict[str, object]],
                         fraction: float = TARGET_FRACTION) -> None:
    """Give every federated run `rounds_to_target` and `uplink_bytes_to_target` against the pooled
    run of its seed (None without one, or when it never gets there)."""
    pooled = {run["seed"]: _mean_metric(run) for run in runs if run["strategy"] == "pooled"}
    for run in runs:
        if run.get("encrypted") is None:
            continue
        reference = pooled.get(run["seed"])
        reached = None if reference is None else rounds_to_target(site_curve(run),
                                                                   fraction * reference)
        run["target"] = None if reference is None else fraction * reference
        run["rounds_to_target"] = reached
        run["uplink_bytes_to_target"] = (None if reached is None else
                                         reached * _number(run.get("uplink_bytes_per_round")))


def summarize(runs: Sequence[Run]) -> list[StrategySummary]:
    """One summary per strategy and mode, in the order they first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run_label(run), []).append(run)
    return [_summary(label, group) for label, group in groups.items()]


def encryption_gap(runs: Sequence[Run]) -> dict[str, float]:
    """Per strategy run both ways, the largest |encrypted - plaintext| of `METRIC` over every site
    and seed that has both runs (runs with client-level DP noise are left out: noise differs)."""
    by_mode: dict[tuple[str, object, bool], dict[str, dict[str, float]]] = {}
    for run in runs:
        if run.get("encrypted") is not None and not noise_multiplier(run):
            by_mode[(str(run["strategy"]), run["seed"], bool(run["encrypted"]))] = _per_site(run)
    gaps: dict[str, float] = {}
    for (strategy, seed, encrypted), sites in by_mode.items():
        plain = by_mode.get((strategy, seed, False))
        if not encrypted or plain is None:
            continue
        shared = sites.keys() & plain.keys()
        gap = max((abs(sites[s][METRIC] - plain[s][METRIC]) for s in shared), default=0.0)
        gaps[strategy] = max(gap, gaps.get(strategy, 0.0))
    return gaps


def _summary(label: str, group: list[Run]) -> StrategySummary:
    per_site_runs = [_per_site(run) for run in group]
    sites = sorted({site for per_site in per_site_runs for site in per_site})
    per_site = {site: Estimate.of([p[site][METRIC] for p in per_site_runs if site in p],
                                  [p[site].get(STANDARD_ERROR, 0.0) for p in per_site_runs
                                   if site in p])
                for site in sites}
    site_means = [mean(p[s][METRIC] for s in p) for p in per_site_runs]
    overall = Estimate(mean(site_means), _mean_ci(per_site_runs),
                       stdev(site_means) if len(site_means) > 1 else None)
    curves = [site_curve(run) for run in group]
    curve = {r: mean(c[r] for c in curves if r in c) for r in sorted({r for c in curves for r in c})}
    reached = [_number(run["rounds_to_target"]) for run in group
               if run.get("rounds_to_target") is not None]
    uplinks = [_number(run["uplink_bytes_to_target"]) for run in group
               if run.get("uplink_bytes_to_target") is not None]
    first = group[0]
    spent = [e for e in map(run_epsilon, group) if e is not None]
    privacy = cast(Mapping[str, object], first.get("privacy") or {})
    return StrategySummary(
        label=label, strategy=str(first["strategy"]),
        encrypted=cast(bool | None, first.get("encrypted")),
        seeds=len(group), per_site=per_site, mean=overall,
        worst_site=min(sites, key=lambda s: per_site[s].mean) if sites else "",
        auc=mean(mean(m.get("auc", 0.5) for m in p.values()) for p in per_site_runs),
        curve=curve, rounds_to_target=mean(reached) if reached else None,
        uplink_bytes_to_target=mean(uplinks) if uplinks else None,
        seconds=mean(_number(run["seconds"]) for run in group),
        uplink_bytes_per_round=mean(_number(run.get("uplink_bytes_per_round")) for run in group),
        noise_multiplier=noise_multiplier(first), epsilon=mean(spent) if spent else None,
        delta=cast(float, privacy["delta"]) if spent else None)


def _mean_ci(per_site_runs: Sequence[Mapping[str, Mapping[str, float]]]) -> float:
    """Half-width of the mean over seeds of the mean over sites: every (seed, site) estimate is
    independent, so their standard errors add in quadrature."""
    terms = [(p[s].get(STANDARD_ERROR, 0.0) / len(p)) ** 2 for p in per_site_runs for s in p]
    return Z95 * math.sqrt(sum(terms)) / len(per_site_runs)


def _per_site(run: Run) -> dict[str, dict[str, float]]:
    per_site = cast(Mapping[str, Mapping[str, float]], run["per_site"])
    return {site: dict(metrics) for site, metrics in per_site.items() if METRIC in metrics}


def _number(value: object) -> float:
    """A run's optional numeric field (None for baselines) as a float."""
    return float(cast(float, value or 0))


def _mean_metric(run: Run) -> float:
    per_site = _per_site(run)
    return mean(m[METRIC] for m in per_site.values())

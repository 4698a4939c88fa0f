"""Show comparison results: a FLamby-style table (strategies x sites) and a plot.

Runs of one strategy with several seeds are one row: cells are means over seeds, and the mean
column carries the spread (± one standard deviation over seeds) when there is more than one.
"""

from pathlib import Path
from statistics import mean, pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

Run = dict[str, object]


def run_label(run: Run) -> str:
    """'fedbn (encrypted)', 'fedavg (plaintext)', or just 'local' for non-federated baselines."""
    mode = run.get("encrypted")
    return str(run["strategy"]) if mode is None else \
        f"{run['strategy']} ({'encrypted' if mode else 'plaintext'})"


def grouped(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by label, in the order labels first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run_label(run), []).append(run)
    return groups


def _sites(runs: list[Run]) -> list[str]:
    return sorted({site for run in runs for site in run["per_site"]})  # type: ignore[union-attr]


def _site_mean(group: list[Run], site: str, metric: str) -> float | None:
    values = [run["per_site"][site][metric] for run in group  # type: ignore[index]
              if metric in run["per_site"].get(site, {})]  # type: ignore[union-attr]
    return mean(values) if values else None


def _run_mean(group: list[Run], metric: str) -> tuple[float, float] | None:
    values = [run["mean"][metric] for run in group if metric in run["mean"]]  # type: ignore[index,operator]
    return (mean(values), pstdev(values)) if values else None


def results_table(runs: list[Run], metric: str = "balanced_accuracy") -> Table:
    """Rows are strategies, columns are sites and their mean, cells are `metric`."""
    sites = _sites(runs)
    seeds = max(len(group) for group in grouped(runs).values()) if runs else 0
    title = f"{metric} on each site's own test split"
    table = Table(title=title if seeds <= 1 else f"{title}, mean of {seeds} seeds")
    for column in ("strategy", *sites, "mean", "seconds", "uplink MB/round"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for label, group in grouped(runs).items():
        cells = [_format(_site_mean(group, s, metric)) for s in sites]
        summary = _run_mean(group, metric)
        mean_cell = "-" if summary is None else \
            f"{summary[0]:.3f}" + (f" ± {summary[1]:.3f}" if len(group) > 1 else "")
        seconds = mean(float(run["seconds"]) for run in group)  # type: ignore[arg-type]
        uplink = mean(float(run.get("uplink_bytes_per_round") or 0) for run in group) / 1e6
        table.add_row(label, *cells, mean_cell, f"{seconds:.0f}", f"{uplink:.2f}" if uplink else "-")
    return table


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mean_by_round(group: list[Run], metric: str) -> dict[int, float]:
    """Mean over sites, then over seeds, of `metric` after each round."""
    by_round: dict[int, list[float]] = {}
    for run in group:
        rounds: dict[str, dict[str, dict[str, float]]] = run.get(  # type: ignore[assignment]
            "evaluate_by_round") or {}
        for r, sites in rounds.items():
            by_round.setdefault(int(r), []).append(mean(m[metric] for m in sites.values()))
    return {r: mean(v) for r, v in sorted(by_round.items())}


def plot_results(runs: list[Run], path: Path, metric: str = "balanced_accuracy") -> Path:
    """Per-site bars for every strategy, and the federated runs' mean metric by round."""
    sites = _sites(runs)
    groups = grouped(runs)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(groups), 1)
    for i, (label, group) in enumerate(groups.items()):
        summary = _run_mean(group, metric)
        values = [_site_mean(group, s, metric) or 0.0 for s in sites] + \
            [summary[0] if summary else 0.0]
        color = f"C{i % 10}"  # the same colour for a strategy in both panels
        bars.bar([x + i * width for x in range(len(sites) + 1)], values, width, label=label,
                 color=color)
        if by_round := _mean_by_round(group, metric):
            curves.plot(list(by_round), list(by_round.values()), marker="o", label=label,
                        color=color)
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(sites) + 1)], [*sites, "mean"])
    bars.set_ylabel(metric)
    bars.set_ylim(0, 1)
    bars.set_title("per site, after the last round")
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)  # off the bars
    curves.set_xlabel("round (0 = starting model)")
    curves.set_ylabel(f"mean {metric} over sites")
    curves.set_ylim(0, 1)
    curves.set_title("federated runs by round")
    curves.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

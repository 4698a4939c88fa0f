"""Show comparison results: a FLamby-style table (strategies x sites) and a plot, with intervals.

Cells are means over seeds with their 95% interval (see `fedhealth.app.summary`). Per-site columns
are shown up to `MAX_SITE_COLUMNS` sites; beyond that a table and bars of a hundred hospitals are
unreadable, so rows show the mean, the worst site and the spread over sites instead.
"""

from collections.abc import Sequence
from pathlib import Path
from statistics import pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table

from fedhealth.app.summary import METRIC, Estimate, Run, StrategySummary, summarize

MAX_SITE_COLUMNS = 6


def results_table(runs: Sequence[Run], title: str = "") -> Table:
    """Rows are strategies; columns the sites (or their worst and spread) and the mean."""
    summaries = summarize(runs)
    sites = sorted({site for s in summaries for site in s.per_site})
    seeds = max((s.seeds for s in summaries), default=0)
    heading = title or f"{METRIC} on each site's own test split"
    seeds_note = f"mean of {seeds} seeds, " if seeds > 1 else ""
    table = Table(title=f"{heading} ({seeds_note}± 95% interval over test images)")
    detail = len(sites) <= MAX_SITE_COLUMNS
    columns = [*sites] if detail else ["worst site", "spread over sites"]
    private = any(s.epsilon is not None for s in summaries)
    for column in ("strategy", *columns, "mean", "AUC", *(["epsilon"] if private else []),
                   "rounds to target", "seconds", "uplink MB/round"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for summary in summaries:
        if detail:
            cells = [_interval(summary.per_site[s]) if s in summary.per_site else "-"
                     for s in sites]
        else:
            worst = summary.per_site[summary.worst_site]
            spread = pstdev(e.mean for e in summary.per_site.values())
            cells = [f"{summary.worst_site} {worst.mean:.3f}", f"sd {spread:.3f}"]
        mean_cell = _interval(summary.mean)
        if summary.mean.seed_sd is not None:
            mean_cell += f" (sd {summary.mean.seed_sd:.3f})"
        reached = ("-" if summary.encrypted is None else
                   "not reached" if summary.rounds_to_target is None else
                   f"{summary.rounds_to_target:.1f}")
        uplink = summary.uplink_bytes_per_round / 1e6
        spent = ([] if not private else ["-" if summary.epsilon is None else
                                          f"{summary.epsilon:.3g} (δ {summary.delta:g})"])
        table.add_row(summary.label, *cells, mean_cell, f"{summary.auc:.3f}", *spent, reached,
                      f"{summary.seconds:.0f}", f"{uplink:.2f}" if uplink else "-")
    return table


def _interval(estimate: Estimate) -> str:
    return f"{estimate.mean:.3f} ± {estimate.ci95:.3f}"


def plot_results(runs: Sequence[Run], path: Path, title: str = "") -> Path:
    """Bars with 95% intervals for every strategy, and the federated runs' mean by round."""
    summaries = summarize(runs)
    sites = sorted({site for s in summaries for site in s.per_site})
    detail = len(sites) <= MAX_SITE_COLUMNS
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(summaries), 1)
    groups = [*sites, "mean"] if detail else ["worst site", "mean"]
    for i, summary in enumerate(summaries):
        estimates = _bar_estimates(summary, sites, detail)
        color = f"C{i % 10}"  # the same colour for a strategy in both panels
        bars.bar([x + i * width for x in range(len(groups))], [e.mean for e in estimates], width,
                 yerr=[e.ci95 for e in estimates], capsize=2, label=summary.label, color=color)
        if summary.curve:
            curves.plot(list(summary.curve), list(summary.curve.values()), marker="o",
                        label=summary.label, color=color)
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups)
    bars.set_ylabel(f"{METRIC} (± 95% interval)")
    bars.set_ylim(0, 1)
    bars.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # chance
    bars.set_title("per site, after the last round")
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)  # off the bars
    curves.set_xlabel("round (0 = starting model)")
    curves.set_ylabel(f"mean {METRIC} over sites")
    curves.set_ylim(0, 1)
    curves.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    curves.set_title("federated runs by round")
    curves.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_privacy(runs: Sequence[Run], path: Path, title: str = "") -> Path:
    """The privacy/utility trade-off: each strategy's mean over sites (± 95% interval) against
    the client-level epsilon it spent; its run without DP is a dashed line, a baseline dotted."""
    summaries = summarize(runs)
    fig, axes = plt.subplots(figsize=(6.5, 4.5))
    strategies = list(dict.fromkeys(s.strategy for s in summaries))
    for i, strategy in enumerate(strategies):
        color = f"C{i % 10}"
        rows = [s for s in summaries if s.strategy == strategy]
        private = sorted((s for s in rows if s.epsilon is not None),
                         key=lambda s: s.epsilon or 0.0)
        if private:
            axes.errorbar([s.epsilon or 0.0 for s in private], [s.mean.mean for s in private],
                          yerr=[s.mean.ci95 for s in private], marker="o", capsize=3,
                          color=color, label=f"{strategy}, DP")
            for s in private:
                axes.annotate(f"z={s.noise_multiplier:g}", (s.epsilon or 0.0, s.mean.mean),
                              textcoords="offset points", xytext=(4, 4), fontsize=7)
        for s in rows:
            if s.epsilon is None:
                axes.axhline(s.mean.mean, color=color, linewidth=1,
                             linestyle=":" if s.encrypted is None else "--",
                             label=f"{s.label}, no DP")
    axes.set_xscale("log")
    axes.set_xlabel("client-level epsilon after the last round (log scale)")
    axes.set_ylabel(f"mean {METRIC} over sites (± 95% interval)")
    axes.set_ylim(0, 1)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_title(title or "privacy against utility")
    axes.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bar_estimates(summary: StrategySummary, sites: list[str], detail: bool) -> list[Estimate]:
    missing = Estimate(0.0, 0.0, None)
    if detail:
        return [summary.per_site.get(s, missing) for s in sites] + [summary.mean]
    return [summary.per_site.get(summary.worst_site, missing), summary.mean]

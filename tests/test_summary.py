"""Comparison statistics: intervals against known cases, rounds_to_target, and the table past 6 sites."""

import math

import pytest
import torch
from rich.console import Console

from fedhealth.app.report import MAX_SITE_COLUMNS, results_table
from fedhealth.app.summary import (
    Z95,
    Estimate,
    add_rounds_to_target,
    encryption_gap,
    rounds_to_target,
    summarize,
)
from sites.training import bootstrap_se, classification_metrics, operating_threshold


def _run(strategy: str, seed: int, per_site: dict[str, tuple[float, float]],
         encrypted: bool | None = True, curve: dict[int, float] | None = None) -> dict[str, object]:
    sites = {s: {"balanced_accuracy": m, "balanced_accuracy_se": se, "auc": 0.9}
             for s, (m, se) in per_site.items()}
    by_round = {str(r): {s: {"balanced_accuracy": v} for s in per_site}
                for r, v in (curve or {}).items()}
    return {"strategy": strategy, "encrypted": encrypted, "seed": seed, "per_site": sites,
            "seconds": 1.0, "uplink_bytes_per_round": 1000.0, "evaluate_by_round": by_round}


def test_bootstrap_se_matches_the_binomial_formula() -> None:
    labels = torch.tensor([0] * 400 + [1] * 400)
    predicted = labels.clone()
    predicted[:60] = 1  # recall 0.85 on class 0
    predicted[400:440] = 0  # recall 0.9 on class 1
    analytic = 0.5 * math.sqrt(0.85 * 0.15 / 400 + 0.9 * 0.1 / 400)
    assert bootstrap_se(predicted, labels, resamples=4000) == pytest.approx(analytic, rel=0.1)
    logits = torch.nn.functional.one_hot(predicted, 2).float()
    assert classification_metrics(logits, labels)["balanced_accuracy"] == pytest.approx(0.875)


def test_estimates_combine_standard_errors_in_quadrature() -> None:
    estimate = Estimate.of([0.8, 0.9], [0.02, 0.02])
    assert estimate.mean == pytest.approx(0.85)
    assert estimate.ci95 == pytest.approx(Z95 * math.sqrt(2 * 0.02**2) / 2)
    assert estimate.seed_sd == pytest.approx(math.sqrt(0.005))
    assert Estimate.of([0.7], [0.03]).seed_sd is None


def test_summary_means_over_seeds_and_sites() -> None:
    runs = [_run("fedavg", 0, {"a": (0.8, 0.02), "b": (0.6, 0.04)}),
            _run("fedavg", 1, {"a": (0.9, 0.02), "b": (0.7, 0.04)})]
    (summary,) = summarize(runs)
    assert summary.label == "fedavg (encrypted)" and summary.seeds == 2
    assert summary.per_site["a"].mean == pytest.approx(0.85)
    assert summary.mean.mean == pytest.approx(0.75)
    assert summary.worst_site == "b"
    # four independent (seed, site) estimates, each weighing 1/4 in the mean
    expected = Z95 * math.sqrt(2 * 0.02**2 + 2 * 0.04**2) / 4
    assert summary.mean.ci95 == pytest.approx(expected)


def test_rounds_to_target_is_the_first_round_reaching_it() -> None:
    curve = {0: 0.95, 1: 0.5, 2: 0.79, 3: 0.81, 4: 0.7}
    assert rounds_to_target(curve, 0.8) == 3  # round 0 (the seed model) never counts
    assert rounds_to_target(curve, 0.9) is None


def test_runs_get_rounds_and_uplink_to_target_against_their_seeds_pooled_run() -> None:
    runs = [_run("pooled", 0, {"a": (0.9, 0.0), "b": (0.9, 0.0)}, encrypted=None),
            _run("fedavg", 0, {"a": (0.85, 0.0), "b": (0.85, 0.0)},
                 curve={1: 0.5, 2: 0.75, 3: 0.82}),
            _run("fedbn", 0, {"a": (0.6, 0.0), "b": (0.6, 0.0)}, curve={1: 0.5, 2: 0.6})]
    add_rounds_to_target(runs, 0.9)
    assert runs[1]["target"] == pytest.approx(0.81)
    assert runs[1]["rounds_to_target"] == 3 and runs[1]["uplink_bytes_to_target"] == 3000.0
    assert runs[2]["rounds_to_target"] is None and runs[2]["uplink_bytes_to_target"] is None
    assert "rounds_to_target" not in runs[0]


def test_encryption_gap_pairs_runs_of_one_seed_and_takes_the_worst_site() -> None:
    runs = [_run("fedavg", 0, {"a": (0.80, 0.0), "b": (0.70, 0.0)}),
            _run("fedavg", 0, {"a": (0.81, 0.0), "b": (0.66, 0.0)}, encrypted=False),
            _run("fedavg", 1, {"a": (0.90, 0.0), "b": (0.90, 0.0)}),  # no plaintext twin
            _run("fedbn", 0, {"a": (0.75, 0.0), "b": (0.75, 0.0)}),
            _run("fedbn", 1, {"a": (0.75, 0.0), "b": (0.75, 0.0)}, encrypted=False),  # other seed
            _run("local", 0, {"a": (0.5, 0.0), "b": (0.5, 0.0)}, encrypted=None)]
    assert encryption_gap(runs) == {"fedavg": pytest.approx(0.04)}


def test_operating_threshold_maximises_balanced_accuracy() -> None:
    # P(class 1) of 0.3 / 0.35 for negatives, 0.4 / 0.45 for positives: argmax calls all negative
    p = torch.tensor([0.3, 0.35, 0.4, 0.45])
    logits = torch.stack([torch.log(1 - p), torch.log(p)], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    threshold = operating_threshold(logits, labels)
    assert 0.35 < threshold <= 0.4
    assert classification_metrics(logits, labels)["balanced_accuracy"] == 0.5
    tuned = classification_metrics(logits, labels, threshold=threshold)
    assert tuned["balanced_accuracy"] == 1.0
    assert operating_threshold(logits, torch.tensor([1, 1, 1, 1])) == 0.5


@pytest.mark.parametrize("sites", [3, MAX_SITE_COLUMNS + 4])
def test_table_shows_sites_up_to_a_handful_then_worst_and_spread(sites: int) -> None:
    names = [f"hospital-{k:03d}" for k in range(sites)]
    runs = [_run("fedavg", 0, {n: (0.5 + k / 100, 0.01) for k, n in enumerate(names)})]
    console = Console(width=400, record=True)
    table = results_table(runs)
    headers = [str(c.header) for c in table.columns]
    console.print(table)
    if sites <= MAX_SITE_COLUMNS:
        assert headers[1:1 + sites] == names
    else:
        assert "worst site" in headers and not set(names) & set(headers)
        assert f"{names[0]} 0.500" in console.export_text()

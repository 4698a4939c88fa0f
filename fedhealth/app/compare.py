"""The strategy grid behind `fedhealth compare`: federated runs plus local and pooled baselines.

Federated strategies run in Flower's simulation engine, encrypted (and optionally plaintext).
The two baselines bracket them: `local` trains each hospital alone, `pooled` trains centrally on
every hospital's training split (the upper bound no privacy rule would allow). All are scored
on each site's own test split with the same training schedule (rounds x local epochs).
With `dp_levels` every federated strategy runs, encrypted, once per client-level noise
multiplier (0: the same run without noise), all with uniform weights (what DP needs, so the
runs differ in their noise alone): the privacy/utility trade-off, epsilon in each run's record.
"""

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from fedhealth.app.simulation import local_superlink, simulate
from fedhealth.app.summary import (
    TARGET_FRACTION,
    StrategySummary,
    add_rounds_to_target,
    summarize,
)
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.keys import init_key_files
from fedhealth.core.crypto.signing import public_key_path
from fedhealth.core.models import model_spec
from fedhealth.core.personalization import POLICY_NAMES
from fedhealth.core.run_history import EVALUATION_METRICS, mean_metrics, write_json_atomically
from sites.dataset import SiteSplits, load_site, site_cache_dir, volume_depth_of
from sites.site_settings import simulated_site_dirs
from sites.training import TrainSettings, score_on_site, train_centrally

BASELINES = ("local", "pooled")
STRATEGY_NAMES = (*BASELINES, *POLICY_NAMES)


def parse_strategies(names: str) -> list[str]:
    """Split a comma list and refuse unknown names up front, before any run starts."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in STRATEGY_NAMES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGY_NAMES)}")
    return chosen


def _train_and_score(train: Dataset, test_sites: Sequence[SiteSplits], config: RunConfig
                     ) -> dict[str, dict[str, float]]:
    """One model trained on `train` for as many epochs as a federated run gets, scored per site
    as a site scores a federated model (`score_on_site`: its own validation split sets the
    operating point)."""
    settings = TrainSettings.from_run_config(config)
    task = model_spec(config.model).task
    model = train_centrally(config.model, train, settings, num_classes=test_sites[0].num_classes,
                            seed=config.seed,
                            epochs=config.num_server_rounds * config.local_epochs)
    scores = {}
    for site in test_sites:
        metrics = score_on_site(model, site, settings, task)
        scores[site.name] = {k: metrics[k] for k in EVALUATION_METRICS if k in metrics}
    return scores


def run_baseline(name: str, sites: Sequence[SiteSplits], config: RunConfig) -> dict[str, object]:
    """`local`: each site trains alone; `pooled`: one model on all training splits."""
    started = time.perf_counter()
    if name == "local":
        per_site = {s.name: _train_and_score(s.train, [s], config)[s.name] for s in sites}
    else:
        per_site = _train_and_score(ConcatDataset([s.train for s in sites]), sites, config)
    return {"strategy": name, "encrypted": None, "rounds": config.num_server_rounds,
            "per_site": per_site, "mean": mean_metrics(per_site),
            "seconds": time.perf_counter() - started, "uplink_bytes_per_round": 0}


KEY_FOLDER = "keys"  # in `runs_folder`: the grid's CKKS and signing keys
STATE_FOLDER = "state"  # in `runs_folder`: the simulated sites' state, shared by every run


def runs_folder(out: Path) -> Path:
    """Where `compare(..., out, ...)` keeps its keys, the sites' state and each run's out-dir."""
    return out.parent / f"{out.stem}-runs"


def parse_noise_levels(levels: str) -> list[float]:
    """`0,0.5,1` as noise multipliers, refused up front when one is not a number >= 0."""
    try:
        values = [float(v) for v in levels.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values):
        raise ValueError(f"noise multipliers {levels!r}: give numbers >= 0 separated by commas, "
                         "e.g. 0,0.5,1 (0: the same run without noise)")
    return values


def _modes(plaintext: bool, dp_levels: Sequence[float] | None
           ) -> list[tuple[bool, float | None]]:
    """(encrypted, noise multiplier or None for the base config's) of each federated run."""
    if dp_levels:
        return [(True, level) for level in dp_levels]
    return [(True, None), (False, None)] if plaintext else [(True, None)]


def compare(data_dir: Path, out: Path, strategies: Sequence[str], base: RunConfig, *,
            repeats: int = 1, plaintext_seeds: int = 0,
            dp_levels: Sequence[float] | None = None,
            target_fraction: float = TARGET_FRACTION,
            on_run: Callable[[str], None] = lambda label: None) -> "Comparison":
    """Run every strategy on the federation in `data_dir`, with seeds base.seed .. +repeats-1.

    A seed sets the patient split, the initial model and the shuffles; every strategy gets the
    same ones, so differences between rows are the strategies'. The first `plaintext_seeds`
    seeds also run each federated strategy unencrypted, which is what encryption's cost in
    accuracy is measured against (`summary.encryption_gap`). Writes `out` as
    `{"runs": [...], "summary": [...]}` and returns the same as a `Comparison`.
    Simulated sites share one state folder, so each decodes its DICOM once for the whole grid.
    """
    work = runs_folder(out)
    key_dir = work / KEY_FOLDER
    site_dirs = simulated_site_dirs(data_dir)
    names = [d.name for d in site_dirs]  # each simulated site signs its replies with its own key
    if not (key_dir / wire.AGGREGATOR_KEY_FILE).exists() or not all(
            public_key_path(key_dir, name).exists() for name in names):
        init_key_files(key_dir, base.crypto_preset, sites=names, overwrite=True)  # our scratch
    runs: list[dict[str, object]] = []
    with local_superlink() as superlink:
        for seed in range(base.seed, base.seed + repeats):
            config = replace(base, seed=seed, data_dir=str(data_dir), key_dir=str(key_dir),
                             state_dir=str(work / STATE_FOLDER))
            for name in strategies:
                if name in BASELINES:
                    on_run(f"{name} (seed {seed})")
                    sites = [load_site(d, image_size=config.image_size, seed=seed,
                                       task=model_spec(config.model).task,
                                       volume_depth=volume_depth_of(config),
                                       in_channels=config.in_channels,
                                       cache_dir=site_cache_dir(work / STATE_FOLDER / d.name))
                             for d in site_dirs]
                    runs.append({**run_baseline(name, sites, config), "seed": seed})
                    continue
                for encrypted, noise in _modes(seed < base.seed + plaintext_seeds, dp_levels):
                    tag = (f"{name}-{'encrypted' if encrypted else 'plaintext'}"
                           f"{'' if noise is None else f'-dp{noise:g}'}-seed{seed}")
                    on_run(tag)
                    shutil.rmtree(work / tag, ignore_errors=True)  # our scratch: re-runs start afresh
                    run_config = replace(config, policy=name, encrypted=encrypted,
                                         out_dir=str(work / tag))
                    if noise is not None:
                        run_config = replace(run_config, dp_noise_multiplier=noise,
                                             uniform_weights=True)
                    runs.append({**simulate(run_config, superlink=superlink), "seed": seed})
    add_rounds_to_target(runs, target_fraction)
    results = Comparison(runs, summarize(runs))
    write_json_atomically(out, results.to_json())
    return results


@dataclass(frozen=True)
class Comparison:
    """Every run (as its results.json record, plus seed and rounds_to_target) and one summary per
    strategy and mode (means over seeds with 95% intervals, `fedhealth.app.summary`)."""

    runs: list[dict[str, object]]
    summaries: list[StrategySummary]

    def to_json(self) -> dict[str, object]:
        return {"runs": self.runs, "summary": [s.to_json() for s in self.summaries]}

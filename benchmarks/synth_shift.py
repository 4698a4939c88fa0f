"""Is the synthetic finding learnable, and does scanner shift hurt? The federation's own model
and training code answer.

Trains the zoo model the federation uses (`fedhealth.core.models`, `tiny` by default) with the
sites' training loop (`sites.training`, the `local`/`pooled` baselines' code) on one hospital and
on all pooled, tests on every hospital's test split, with scanner shift on and off. Prints
accuracy, balanced accuracy and ROC AUC per test site; `--json OUT` writes them.
"""

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from fedhealth.core.config import RunConfig
from fedhealth.core.models import model_spec
from fedhealth.core.synth import synthesize_federation
from sites.dataset import SiteSplits, load_site
from sites.training import TrainSettings, evaluate_model, train_centrally

METRICS = ("accuracy", "balanced_accuracy", "auc")


def train_and_test(train: Dataset, sites: list[SiteSplits], config: RunConfig,
                   epochs: int) -> dict[str, dict[str, float]]:
    """One model trained on `train` as a site trains, scored on every site's test split."""
    settings = TrainSettings.from_run_config(config)
    model = train_centrally(config.model, train, settings, num_classes=sites[0].num_classes,
                            seed=config.seed, epochs=epochs)
    task = model_spec(config.model).task
    return {s.name: {k: v for k, v in evaluate_model(model, s.test, settings, task).items()
                     if k in METRICS} for s in sites}


def experiment(root: Path, shift: float, images: int, epochs: int,
               config: RunConfig) -> dict[str, dict[str, dict[str, float]]]:
    synthesize_federation(root, 3, config.seed, images_per_site=images, label_skew=0.0,
                          scanner_shift=shift, image_size=config.image_size)
    sites = [load_site(d, image_size=config.image_size, seed=config.seed)
             for d in sorted(root.iterdir())]
    return {"trained on hospital-1": train_and_test(sites[0].train, sites, config, epochs),
            "trained on all (pooled)": train_and_test(ConcatDataset([s.train for s in sites]),
                                                      sites, config, epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200, help="images per site")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--model", default="tiny", help="zoo model")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = RunConfig(model=args.model, learning_rate=args.learning_rate, seed=args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shift in (0.0, 1.0):
            results[f"scanner_shift={shift}"] = experiment(Path(tmp) / str(shift), shift,
                                                           args.images, args.epochs, config)
    for setting, runs in results.items():
        for name, per_site in runs.items():
            row = "  ".join(f"{site}: acc {m['accuracy']:.2f} bal {m['balanced_accuracy']:.2f} "
                            f"auc {m['auc']:.2f}" for site, m in per_site.items())
            print(f"{setting:18s} {name:24s} {row}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "run_config": asdict(config), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()

"""Is the synthetic finding learnable, and does scanner shift hurt? A tiny CNN answers.

Trains on one hospital (and on all pooled), tests on every hospital's test split, with scanner
shift on and off. Prints accuracy and ROC AUC per test site; `--json OUT` writes them.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedhealth.core.synth import synthesize_federation
from sites.dataset import load_site


def tiny_cnn() -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    # Global max pooling: the finding is a local blob, present or not anywhere in the lungs.
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 2))


def train(data: Dataset, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=16, shuffle=True)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(batch["image"]), batch["label"]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> dict[str, float]:
    batch = next(iter(DataLoader(data, batch_size=len(data))))
    scores = model(batch["image"]).softmax(1)[:, 1].numpy()
    labels = batch["label"].numpy()
    pos, neg = scores[labels == 1], scores[labels == 0]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return {"accuracy": float(((scores > 0.5) == labels).mean()), "auc": auc}


def experiment(root: Path, shift: float, images: int, epochs: int, seed: int) -> dict[str, object]:
    synthesize_federation(root, 3, seed, images_per_site=images, label_skew=0.0,
                          scanner_shift=shift)
    sites = [load_site(d, seed=seed) for d in sorted(root.iterdir())]
    trained = {"trained on hospital-1": train(sites[0].train, epochs, seed),
               "trained on all (pooled)": train(ConcatDataset([s.train for s in sites]), epochs,
                                                seed)}
    return {name: {s.name: evaluate(model, s.test) for s in sites}
            for name, model in trained.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200, help="images per site")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shift in (0.0, 1.0):
            results[f"scanner_shift={shift}"] = experiment(Path(tmp) / str(shift), shift,
                                                           args.images, args.epochs, args.seed)
    for setting, runs in results.items():
        for name, per_site in runs.items():  # type: ignore[union-attr]
            row = "  ".join(f"{site}: acc {m['accuracy']:.2f} auc {m['auc']:.2f}"
                            for site, m in per_site.items())
            print(f"{setting:18s} {name:24s} {row}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

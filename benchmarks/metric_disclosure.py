"""How well one evaluate reply pins down a site's test-split class counts, with and without the
site's disclosure settings (`metric-decimals`, `withhold-metrics`).

An evaluate reply carries n (num-examples), accuracy (TP + TN) / n, balanced accuracy
(TP / P + TN / N) / 2 and AUC = k / (P * N). For each test split below, a model's scores are drawn,
the reply is formed as the site would send it (`sites.disclosure.MetricDisclosure`), and every
class split P + N = n (with any TP, TN, k) that reproduces the sent values is counted: one or two
candidates (P and its swap N) means the site's class counts are known.
"""

import argparse
import json
from collections.abc import Mapping

import numpy as np

from sites.disclosure import MetricDisclosure

SETTINGS = {"full precision": MetricDisclosure(),
            "metric-decimals=2": MetricDisclosure(decimals=2),
            "metric-decimals=1": MetricDisclosure(decimals=1),
            "metric-decimals=1, withhold accuracy,auc": MetricDisclosure(
                decimals=1, withheld=frozenset({"accuracy", "auc"}))}


def reply_metrics(positives: int, negatives: int, rng: np.random.Generator) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUC of a moderately good model on one test split."""
    y = np.r_[np.ones(positives, int), np.zeros(negatives, int)]
    scores = rng.normal(size=y.size) + 0.8 * y
    predicted = (scores > 0.4).astype(int)
    recall = [(predicted[y == c] == c).mean() for c in (1, 0)]
    pairs = scores[y == 1][:, None] > scores[y == 0][None, :]
    return {"accuracy": float((predicted == y).mean()), "balanced_accuracy": float(np.mean(recall)),
            "auc": float(pairs.mean())}


def candidates(n: int, sent: Mapping[str, float], shown: MetricDisclosure) -> list[int]:
    """Every positive count P (0 < P < n) some TP, TN and AUC numerator reproduce `sent` with."""
    def same(name: str, value: float) -> bool:
        return name not in sent or abs(shown.metrics({name: value})[name] - sent[name]) < 1e-9

    found = []
    for p in range(1, n):
        q = n - p
        auc_ok = any(same("auc", k / (p * q)) for k in range(p * q + 1)) if "auc" in sent else True
        if auc_ok and any(same("accuracy", (tp + tn) / n) and
                          same("balanced_accuracy", (tp / p + tn / q) / 2)
                          for tp in range(p + 1) for tn in range(q + 1)):
            found.append(p)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="7:17,12:12,5:31,20:16", help="P:N test splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    results = []
    for split in args.splits.split(","):
        p, q = (int(x) for x in split.split(":"))
        exact = reply_metrics(p, q, rng)
        row = {"positives": p, "negatives": q}
        for label, shown in SETTINGS.items():
            row[label] = len(candidates(p + q, shown.metrics(exact), shown))
        results.append(row)
        print(f"n={p + q} (P={p}): " + ", ".join(f"{k}: {row[k]} candidates" for k in SETTINGS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

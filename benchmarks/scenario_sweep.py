"""The README's strategy table: every named scenario x every strategy x 3 seeds, encrypted.

    python benchmarks/scenario_sweep.py --out runs/sweep            # the full sweep (hours)
    python benchmarks/scenario_sweep.py --out runs/quick --images-per-site 600 --seeds 1

Each scenario is synthesized once (its own sizes unless --images-per-site), then `compare` runs
all strategies with the run config's default schedule for each seed; the first seed
(--plaintext-seeds) also runs every federated strategy unencrypted. Prints one markdown table
per scenario (mean balanced accuracy over seeds, ± 95% interval over test images, the winner, and
the largest encrypted-vs-plaintext difference on any site), and writes everything to
the record (--record, by default OUT/sweep.json) with the wall time of each scenario. A scenario
already in the record from the same seeds and sizes is kept, not run again, so a sweep interrupted
(or run a few scenarios at a time, on different machines) completes where it stopped.
`benchmarks/results/scenario_sweep.json` is the record behind the README's tables:

    python benchmarks/scenario_sweep.py --out DIR --record benchmarks/results/scenario_sweep.json

prints them all from it and runs only the scenarios it lacks.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedhealth.app.compare import STRATEGY_NAMES, compare
from fedhealth.app.summary import encryption_gap
from fedhealth.core.atomic_file import write_atomically
from fedhealth.core.config import RunConfig
from fedhealth.core.synth.federation import synthesize
from fedhealth.core.synth.scenarios import SCENARIO_NAMES, get_scenario


def markdown(name: str, rows: list[dict[str, Any]], gaps: dict[str, float], seconds: float) -> str:
    """One scenario's table (rows: `StrategySummary.to_json()`, the encrypted and baseline ones):
    sites as columns, the mean with its interval, the winner marked, and each strategy's
    `encryption_gap`."""
    rows = [row for row in rows if row["encrypted"] is not False]
    sites = sorted({site for row in rows for site in row["per_site"]})
    federated = [row for row in rows if row["encrypted"] is not None]
    best = max(federated, key=lambda row: row["mean"]["mean"])["label"] if federated else ""
    lines = [f"**{name}** ({seconds / 60:.0f} min)", "",
             "| strategy | " + " | ".join(sites) + " | mean ± 95% CI | sd over seeds | "
             "rounds to 90% of pooled | \\|encrypted - plaintext\\| |",
             "| --- |" + " --- |" * (len(sites) + 4)]
    for row in rows:
        cells = [f"{row['per_site'][s]['mean']:.3f}" for s in sites]
        label = f"**{row['label']}**" if row["label"] == best else row["label"]
        spread = row["mean"]["seed_sd"]
        sd = "-" if spread is None else f"{spread:.3f}"
        reached = ("-" if row["encrypted"] is None else "not reached"
                   if row["rounds_to_target"] is None else f"{row['rounds_to_target']:.1f}")
        gap = gaps.get(row["strategy"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['mean']['mean']:.3f} ± "
                     f"{row['mean']['ci95']:.3f} | {sd} | {reached} | "
                     + ("-" if gap is None else f"{gap:.3f}") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIO_NAMES))
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed (data and runs)")
    parser.add_argument("--plaintext-seeds", type=int, default=1,
                        help="how many seeds, from the first, also run unencrypted")
    parser.add_argument("--images-per-site", type=int, default=None)
    parser.add_argument("--preset", default=RunConfig.crypto_preset,
                        help="the encrypted runs' crypto preset (e.g. packed, to measure its "
                             "accuracy against plaintext; give it its own --record)")
    parser.add_argument("--record", type=Path, default=None,
                        help="the JSON record to complete (default: OUT/sweep.json)")
    args = parser.parse_args()
    record: Path = args.record or args.out / "sweep.json"
    base = RunConfig(seed=args.seed, crypto_preset=args.preset)  # a bad --preset fails here
    sweep: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
    for name in args.scenarios.split(","):
        scenario = get_scenario(name)
        if args.images_per_site:
            scenario = scenario.resized(images_per_site=args.images_per_site)
        sizes = [s.images for s in scenario.sites]
        wanted = {"seed": args.seed, "seeds": args.seeds, "plaintext_seeds": args.plaintext_seeds,
                  "images_per_site": sizes, "crypto_preset": args.preset}
        kept = sweep.get(name, {})
        if all(kept.get(field) == value for field, value in wanted.items()):
            print(markdown(name, kept["summary"], kept["encryption_gap"], kept["seconds"]), flush=True)
            continue
        started = time.perf_counter()
        folder = args.out / name
        synthesize(folder / "hospitals", scenario, args.seed, overwrite=True)
        results = compare(folder / "hospitals", folder / "results.json",
                          args.strategies.split(","), base,
                          repeats=args.seeds, plaintext_seeds=args.plaintext_seeds,
                          on_run=lambda tag, name=name: print(f"  {name}: {tag}", flush=True))
        seconds = time.perf_counter() - started
        rows = [row.to_json() for row in results.summaries]
        gaps = encryption_gap(results.runs)
        print(markdown(name, rows, gaps, seconds), flush=True)
        sweep[name] = {"seconds": seconds, **wanted, "summary": rows, "encryption_gap": gaps}
        record.parent.mkdir(parents=True, exist_ok=True)
        # atomically: a crash mid-write must not lose the scenarios already recorded
        write_atomically(record, (json.dumps(sweep, indent=2) + "\n").encode(), mode=0o644)

if __name__ == "__main__":
    main()

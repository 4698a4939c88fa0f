"""The README's strategy table: every named scenario x every strategy x 3 seeds, encrypted.

    python benchmarks/scenario_sweep.py --out runs/sweep            # the full sweep (hours)
    python benchmarks/scenario_sweep.py --out runs/quick --images-per-site 600 --seeds 1

Each scenario is synthesized once (its own sizes unless --images-per-site), then `compare` runs
all strategies with the run config's default schedule for each seed. Prints one markdown table
per scenario (mean balanced accuracy over seeds, ± 95% interval over test images, and the winner),
and writes everything to OUT/sweep.json with the wall time of each scenario.
"""

import argparse
import json
import time
from pathlib import Path

from fedhealth.app.compare import STRATEGY_NAMES, compare
from fedhealth.app.summary import StrategySummary
from fedhealth.core.config import RunConfig
from fedhealth.core.synth.federation import synthesize
from fedhealth.core.synth.scenarios import SCENARIO_NAMES, get_scenario


def markdown(name: str, rows: list[StrategySummary], seconds: float) -> str:
    """One scenario's table: sites as columns, the mean with its interval, the winner marked."""
    sites = sorted({site for row in rows for site in row.per_site})
    federated = [row for row in rows if row.encrypted is not None]
    best = max(federated, key=lambda row: row.mean.mean).label if federated else ""
    lines = [f"**{name}** ({seconds / 60:.0f} min)", "",
             "| strategy | " + " | ".join(sites) + " | mean ± 95% CI | sd over seeds | "
             "rounds to 90% of pooled |",
             "| --- |" + " --- |" * (len(sites) + 3)]
    for row in rows:
        cells = [f"{row.per_site[s].mean:.3f}" for s in sites]
        label = f"**{row.label}**" if row.label == best else row.label
        sd = "-" if row.mean.seed_sd is None else f"{row.mean.seed_sd:.3f}"
        reached = ("-" if row.encrypted is None else "not reached"
                   if row.rounds_to_target is None else f"{row.rounds_to_target:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {row.mean.mean:.3f} ± {row.mean.ci95:.3f} | {sd} | {reached} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIO_NAMES))
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed (data and runs)")
    parser.add_argument("--images-per-site", type=int, default=None)
    args = parser.parse_args()
    sweep: dict[str, object] = {}
    for name in args.scenarios.split(","):
        started = time.perf_counter()
        scenario = get_scenario(name)
        if args.images_per_site:
            scenario = scenario.resized(images_per_site=args.images_per_site)
        folder = args.out / name
        synthesize(folder / "hospitals", scenario, args.seed, overwrite=True)
        results = compare(folder / "hospitals", folder / "results.json",
                          args.strategies.split(","), RunConfig(seed=args.seed),
                          repeats=args.seeds,
                          on_run=lambda tag, name=name: print(f"  {name}: {tag}", flush=True))
        seconds = time.perf_counter() - started
        rows = results.summaries
        print(markdown(name, rows, seconds), flush=True)
        sweep[name] = {"seconds": seconds, "images_per_site": [s.images for s in scenario.sites],
                       "summary": [row.to_json() for row in rows]}
        (args.out / "sweep.json").write_text(json.dumps(sweep, indent=2))


if __name__ == "__main__":
    main()

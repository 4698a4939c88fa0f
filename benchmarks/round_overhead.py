"""Encrypted vs plaintext round wall time on the demo federation, in one run.

    python benchmarks/round_overhead.py --json OUT.json

Synthesizes the demo's hospitals (`fedhealth.app.demo`), runs the demo's federation config once
encrypted (`EncryptedFedAvg`, CKKS) and once in plaintext (Flower's FedAvg) in the simulation
engine, and compares the median wall time of rounds 1..R (train + evaluate, from the run
history's `round_seconds`). The median keeps round 1's one-off warm-up out of the figure;
`--repeats N` alternates N encrypted and N plaintext runs and pools their rounds, so a change
in machine load hits both alike. Target: encrypted / plaintext <= 1.3.
"""

import argparse
import json
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedhealth.app.demo import DEMO_CONFIG, DEMO_IMAGES_PER_SITE, DEMO_SITES
from fedhealth.app.simulation import LocalSuperLink, local_superlink, simulate
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.keys import init_key_files
from fedhealth.core.synth import synthesize_federation

TARGET_RATIO = 1.3


def round_seconds(config: RunConfig,
                  superlink: LocalSuperLink) -> tuple[list[float], dict[str, object]]:
    """One federation run: the wall time of each round >= 1, and the run's results."""
    results = simulate(config, superlink=superlink)
    rounds = sorted((int(r), float(s)) for r, s in results["round_seconds"].items() if int(r) >= 1)
    return [s for _, s in rounds], results


def summarize(config: RunConfig,
              runs: list[tuple[list[float], dict[str, object]]]) -> dict[str, object]:
    """Median over the rounds of every repeat, and what the runs sent and scored."""
    rounds = [seconds for seconds, _ in runs]
    results = [result for _, result in runs]
    return {"name": "encrypted" if config.encrypted else "plaintext",
            "crypto_preset": config.crypto_preset if config.encrypted else None,
            "round_seconds": rounds,
            "median_round_seconds": statistics.median(s for run in rounds for s in run),
            "run_seconds": [float(r["seconds"]) for r in results],
            "uplink_bytes_per_round": float(results[0]["uplink_bytes_per_round"]),
            "mean": results[0]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=DEMO_CONFIG.num_server_rounds)
    parser.add_argument("--policy", default=DEMO_CONFIG.policy)
    parser.add_argument("--preset", default=DEMO_CONFIG.crypto_preset, help="CKKS preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternated")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        work = Path(tmp)
        synthesize_federation(work / "hospitals", DEMO_SITES, args.seed,
                              images_per_site=DEMO_IMAGES_PER_SITE,
                              image_size=DEMO_CONFIG.image_size)
        init_key_files(work / "keys", args.preset)
        base = replace(DEMO_CONFIG, num_server_rounds=args.rounds, policy=args.policy,
                       crypto_preset=args.preset, seed=args.seed,
                       data_dir=str(work / "hospitals"), key_dir=str(work / "keys"))
        configs = [replace(base, encrypted=encrypted) for encrypted in (True, False)]
        measured: dict[bool, list[tuple[list[float], dict[str, object]]]] = {True: [], False: []}
        with local_superlink() as superlink:  # one SuperLink for every run, stopped at the end
            for repeat in range(args.repeats):
                for config in configs:
                    out = work / f"{'encrypted' if config.encrypted else 'plaintext'}-{repeat}"
                    measured[config.encrypted].append(round_seconds(
                        replace(config, out_dir=str(out), state_dir=str(out / "state")),
                        superlink))
        runs = [summarize(c, measured[c.encrypted]) for c in configs]
    load_after = os.getloadavg()
    encrypted, plaintext = runs
    ratio = encrypted["median_round_seconds"] / plaintext["median_round_seconds"]

    table = Table(title=f"{DEMO_SITES} demo hospitals {DEMO_IMAGES_PER_SITE}, policy "
                        f"{args.policy}, {args.rounds} rounds x {args.repeats}; load average "
                        f"{load_before[0]:.1f} -> {load_after[0]:.1f}")
    for column in ("run", "median s/round", "rounds 1..R (s)", "uplink MB/round",
                   "mean balanced acc."):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in runs:
        label = run["name"] + (f" ({run['crypto_preset']})" if run["crypto_preset"] else "")
        table.add_row(label, f"{run['median_round_seconds']:.2f}",
                      " | ".join(" ".join(f"{s:.1f}" for s in rounds)
                                 for rounds in run["round_seconds"]),
                      f"{run['uplink_bytes_per_round'] / 1e6:.2f}",
                      f"{run['mean'].get('balanced_accuracy', float('nan')):.3f}")
    Console().print(table)
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"round overhead: encrypted / plaintext = {ratio:.2f} "
          f"({verdict} the target <= {TARGET_RATIO})")
    if args.json:
        args.json.write_text(json.dumps({
            "sites": DEMO_SITES, "images_per_site": list(DEMO_IMAGES_PER_SITE),
            "rounds": args.rounds, "repeats": args.repeats, "policy": args.policy,
            "seed": args.seed,
            "cpus": os.cpu_count(), "load_average_1min": [load_before[0], load_after[0]],
            "runs": runs, "ratio": ratio, "target_ratio": TARGET_RATIO,
        }, indent=2))


if __name__ == "__main__":
    main()

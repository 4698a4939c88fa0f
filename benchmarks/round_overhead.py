"""Encrypted vs plaintext round wall time on a synthetic federation, in one run.

    python benchmarks/round_overhead.py --json OUT.json

Synthesizes hospitals (`--images 180,150,120` by default), runs the run config's defaults once
encrypted (`EncryptedFedAvg`, CKKS, signed replies) and once in plaintext (Flower's FedAvg) in the
simulation engine, the real ServerApp and ClientApp on one local SuperLink, and compares the
median wall time of rounds 1..R (train + evaluate, from the run history's `round_seconds`). The
median keeps round 1's one-off warm-up out of the figure; `--repeats N` alternates N encrypted
and N plaintext runs and pools their rounds, so a change in machine load hits both alike.
Target: encrypted / plaintext <= 1.3.
"""

import argparse
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedhealth.app.simulation import LocalSuperLink, local_superlink, simulate
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.keys import init_key_files
from fedhealth.core.synth import synthesize_federation
from sites.site_settings import simulated_site_dirs

TARGET_RATIO = 1.3
BASE = RunConfig()  # what a user gets


@dataclass(frozen=True)
class Run:
    """What one federation run contributes: its round times (rounds >= 1) and what it sent and
    scored."""

    round_seconds: list[float]
    run_seconds: float
    uplink_bytes_per_round: float
    balanced_accuracy: float


@dataclass(frozen=True)
class Mode:
    """Every repeat of one mode (encrypted or plaintext), pooled: the median round is the figure."""

    name: str
    crypto_preset: str | None
    runs: list[Run]

    @property
    def median_round_seconds(self) -> float:
        return statistics.median(s for run in self.runs for s in run.round_seconds)


def measure(config: RunConfig, superlink: LocalSuperLink) -> Run:
    """One federation run, read back from the results.json the ServerApp wrote."""
    results = simulate(config, superlink=superlink)
    by_round, mean = results["round_seconds"], results["mean"]
    if not isinstance(by_round, dict) or not isinstance(mean, dict):
        raise SystemExit(f"{config.out_dir}: results.json lacks round_seconds or mean")
    return Run(round_seconds=[by_round[r] for r in sorted(by_round, key=int) if int(r) >= 1],
               run_seconds=float(str(results["seconds"])),
               uplink_bytes_per_round=float(str(results["uplink_bytes_per_round"])),
               balanced_accuracy=mean.get("balanced_accuracy", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="180,150,120", help="images per hospital")
    parser.add_argument("--rounds", type=int, default=BASE.num_server_rounds)
    parser.add_argument("--policy", default=BASE.policy)
    parser.add_argument("--preset", default=BASE.crypto_preset, help="CKKS preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternated")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")

    images = [int(n) for n in args.images.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        work = Path(tmp)
        synthesize_federation(work / "hospitals", len(images), args.seed,
                              images_per_site=images, image_size=BASE.image_size)
        init_key_files(work / "keys", args.preset,
                       sites=[d.name for d in simulated_site_dirs(work / "hospitals")])
        base = replace(BASE, num_server_rounds=args.rounds, policy=args.policy,
                       crypto_preset=args.preset, seed=args.seed,
                       data_dir=str(work / "hospitals"), key_dir=str(work / "keys"))
        configs = [replace(base, encrypted=encrypted) for encrypted in (True, False)]
        measured: dict[bool, list[Run]] = {True: [], False: []}
        with local_superlink() as superlink:  # one SuperLink for every run, stopped at the end
            for repeat in range(args.repeats):
                for config in configs:
                    out = work / f"{'encrypted' if config.encrypted else 'plaintext'}-{repeat}"
                    measured[config.encrypted].append(measure(
                        replace(config, out_dir=str(out), state_dir=str(out / "state")),
                        superlink))
        modes = [Mode("encrypted" if c.encrypted else "plaintext",
                      c.crypto_preset if c.encrypted else None, measured[c.encrypted])
                 for c in configs]
    load_after = os.getloadavg()
    encrypted, plaintext = modes
    ratio = encrypted.median_round_seconds / plaintext.median_round_seconds

    table = Table(title=f"{len(images)} hospitals {args.images}, policy "
                        f"{args.policy}, {args.rounds} rounds x {args.repeats}; load average "
                        f"{load_before[0]:.1f} -> {load_after[0]:.1f}")
    for column in ("run", "median s/round", "rounds 1..R (s)", "uplink MB/round",
                   "mean balanced acc."):
        table.add_column(column, justify="left" if column == "run" else "right")
    for mode in modes:
        label = mode.name + (f" ({mode.crypto_preset})" if mode.crypto_preset else "")
        table.add_row(label, f"{mode.median_round_seconds:.2f}",
                      " | ".join(" ".join(f"{s:.1f}" for s in run.round_seconds)
                                 for run in mode.runs),
                      f"{mode.runs[0].uplink_bytes_per_round / 1e6:.2f}",
                      f"{mode.runs[0].balanced_accuracy:.3f}")
    Console().print(table)
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"round overhead: encrypted / plaintext = {ratio:.2f} "
          f"({verdict} the target <= {TARGET_RATIO})")
    if args.json:
        args.json.write_text(json.dumps({
            "sites": len(images), "images_per_site": images,
            "rounds": args.rounds, "repeats": args.repeats, "policy": args.policy,
            "seed": args.seed,
            "cpus": os.cpu_count(), "load_average_1min": [load_before[0], load_after[0]],
            "modes": [asdict(m) | {"median_round_seconds": m.median_round_seconds}
                      for m in modes],
            "ratio": ratio, "target_ratio": TARGET_RATIO,
        }, indent=2))


if __name__ == "__main__":
    main()

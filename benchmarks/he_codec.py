"""CKKS codec cost per preset against plaintext float32: bytes, encrypt, aggregate, decrypt, error.

    python benchmarks/he_codec.py --params 1000000 --sites 8 --workers 1,2 --json OUT.json

Each site sends a_k * w_k; the aggregator parses, checks and adds what it receives (the code
path of `EncryptedFedAvg`), and a site decrypts the sum and divides by s.
`aggregate_mparams_per_s` is per site update: sites * params / aggregation seconds.
Timing is per site update: each step (one site's encryption, one update's parse and check,
the final serialization, ...) runs `--repeat` times, its fastest run counts, and the steps add
up. On a shared machine that keeps other processes' bursts out of the figures; the `*_cpu_*`
fields use CPU time on the critical path instead of the wall clock: this process's, or the
busiest codec worker's when that is more (SEAL runs on one thread in each), so they show what
the parallel codec gains on idle cores even when the machine is busy. The load average before
and after goes into the JSON.
Each preset runs once per `--workers` count (the site codec's processes, `chunk_pool`); the
`speedup` lines compare each count with the first. `--thread-probe` first times one
ciphertext batch encrypted by one thread and by two, which tells whether SEAL releases the GIL.
`max_abs_error` is against numpy's float64 weighted mean; the `packed` preset's bound is
`Quantization.mean_error(sites, 1)`, printed beside it.
"""

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord
from rich.console import Console
from rich.progress import track
from rich.table import Table

from fedhealth.core.crypto.chunk_pool import worker_pids
from fedhealth.core.crypto.codec import decrypt_global, encrypt_update, encrypt_vector
from fedhealth.core.crypto.keys import (
    SiteKey,
    init_key_files,
    load_aggregator_context,
    load_site_context,
)
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.presets import get_preset
from fedhealth.core.crypto.wire import ciphertexts_to_record
from strategies.ciphertext_sum import sum_updates

T = TypeVar("T")


def site_updates(params: int, sites: int, seed: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = [{"w": rng.normal(0, 0.1, size=params).astype(np.float32)} for _ in range(sites)]
    weights = rng.integers(10, 1000, size=sites).astype(np.float64)
    return tensors, weights / weights.sum()


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def worker_cpu() -> dict[int, float]:
    """CPU seconds each codec worker process has used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in worker_pids():
        with open(f"/proc/{pid}/stat") as stat:  # utime and stime are fields 14 and 15
            fields = stat.read().rsplit(")", 1)[1].split()
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


@dataclass
class Clock:
    """Wall-clock and critical-path CPU seconds of a phase: the sum over its steps of each
    step's fastest run."""

    wall: float = 0.0
    cpu: float = 0.0

    def fastest(self, repeat: int, step: Callable[[], T]) -> T:
        walls, cpus = [], []
        for _ in range(repeat):
            wall, cpu, workers = time.perf_counter(), time.process_time(), worker_cpu()
            result = step()
            walls.append(time.perf_counter() - wall)
            busiest = max((t - workers.get(pid, 0.0) for pid, t in worker_cpu().items()),
                          default=0.0)
            cpus.append(max(time.process_time() - cpu, busiest))
        self.wall += min(walls)
        self.cpu += min(cpus)
        return result


def row(name: str, workers: int, bytes_per_param: float, params: int, sites: int,
        encrypt: Clock, aggregate: Clock, decrypt: Clock, error: float
        ) -> dict[str, float | str]:
    """One result entry; encrypt and aggregate cover all sites' updates, decrypt one global."""
    rates = {"encrypt": (encrypt, sites), "aggregate": (aggregate, sites), "decrypt": (decrypt, 1)}
    return {"name": name, "workers": float(workers), "bytes_per_param": bytes_per_param,
            **{f"{k}_mparams_per_s": n * params / c.wall / 1e6 for k, (c, n) in rates.items()},
            "max_abs_error": error,
            **{f"{k}_cpu_mparams_per_s": n * params / c.cpu / 1e6 for k, (c, n) in rates.items()}}


def thread_probe(site: SiteKey, ciphertexts: int = 400) -> tuple[float, float]:
    """(wall seconds with one thread / with two, CPU seconds / wall seconds with two) for the
    same ciphertexts: ~1 and ~1 when SEAL holds the GIL, ~2 and ~2 when it does not."""
    values = np.random.default_rng(0).normal(size=(2, ciphertexts // 2 * site.preset.values_per_ciphertext))
    timings = {}
    for threads in (1, 2):
        wall, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda v: encrypt_vector(site, v), values if threads == 2 else [values.ravel()]))
        timings[threads] = (time.perf_counter() - wall, time.process_time() - cpu)
    return timings[1][0] / timings[2][0], timings[2][1] / timings[2][0]


def measure_preset(name: str, tensors: list[dict[str, np.ndarray]], weights: np.ndarray,
                   expected: np.ndarray, repeat: int, workers: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        init_key_files(Path(tmp), name)
        site = load_site_context(Path(tmp) / "site.ctx")
        aggregator = load_aggregator_context(Path(tmp) / "aggregator.ctx")
    encrypt, aggregate, decrypt = Clock(), Clock(), Clock()
    encrypt_update(site, tensors[0], float(weights[0]), workers=workers)  # start the processes
    records = [encrypt.fastest(repeat, lambda t=t, a=a: encrypt_update(site, t, float(a),
                                                                       workers=workers))
               for t, a in track(list(zip(tensors, weights)),
                                 description=f"{name}, {workers} workers: encrypt")]

    # `sum_updates`: what `EncryptedFedAvg.aggregate_train` does with the valid replies' ciphertexts
    total = aggregate.fastest(repeat, lambda: sum_updates(aggregator, records))
    assert total is not None, "every update was refused"
    summed = ciphertexts_to_record(total.ciphertexts)

    mean = decrypt.fastest(repeat, lambda: decrypt_global(
        site, summed, TensorLayout.of(tensors[0]), float(weights.sum()), workers=workers)["w"])
    params = tensors[0]["w"].size
    return row(name, workers, record_bytes(records[0]) / params, params, len(records), encrypt,
               aggregate, decrypt, float(np.max(np.abs(mean.astype(np.float64) - expected))))


def measure_plaintext(tensors: list[dict[str, np.ndarray]], weights: np.ndarray,
                      expected: np.ndarray, repeat: int) -> dict[str, float | str]:
    """Flower's FedAvg path: float32 arrays in an ArrayRecord, weighted sum at the server."""
    encode, aggregate, decode = Clock(), Clock(), Clock()
    records = [encode.fastest(repeat, lambda t=t: ArrayRecord({"w": Array(t["w"])}))
               for t in tensors]
    summed = aggregate.fastest(repeat, lambda: ArrayRecord({"w": Array(np.asarray(
        sum(r["w"].numpy() * np.float32(a) for r, a in zip(records, weights, strict=True)),
        dtype=np.float32))}))
    mean = decode.fastest(repeat, lambda: summed["w"].numpy() / np.float32(weights.sum()))
    params = tensors[0]["w"].size
    return row("plaintext", 1, record_bytes(records[0]) / params, params, len(records), encode,
               aggregate, decode, float(np.max(np.abs(mean.astype(np.float64) - expected))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--presets", default="default,compact,nvflare,packed")
    parser.add_argument("--workers", default="1", help="comma list of site codec process counts")
    parser.add_argument("--thread-probe", action="store_true",
                        help="first measure whether two threads encrypt faster than one")
    parser.add_argument("--repeat", type=int, default=5, help="runs per timed step; the "
                        "fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    tensors, weights = site_updates(args.params, args.sites, args.seed)
    expected = np.average([t["w"].astype(np.float64) for t in tensors], axis=0, weights=weights)
    load_before = os.getloadavg()
    probe = None
    if args.thread_probe:
        with tempfile.TemporaryDirectory() as tmp:
            init_key_files(Path(tmp), "default")
            probe = thread_probe(load_site_context(Path(tmp) / "site.ctx"))
        print(f"threads: 2 threads encrypt x{probe[0]:.2f} as fast as 1, using {probe[1]:.2f} "
              "cores (1.00: SEAL holds the GIL)")
    counts = [int(w) for w in args.workers.split(",")]
    results = [measure_preset(name, tensors, weights, expected, args.repeat, workers)
               for name in args.presets.split(",") for workers in counts]
    results.append(measure_plaintext(tensors, weights, expected, args.repeat))
    load_after = os.getloadavg()

    table = Table(title=f"{args.params:,} params, {args.sites} sites, best of {args.repeat}; "
                        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    for column in results[0]:
        table.add_column(column.replace("_mparams_per_s", " Mp/s").replace("_", " "),
                         justify="right")
    for entry in results:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else v for v in entry.values()))
    Console(width=200).print(table)
    for name in args.presets.split(","):
        runs = [r for r in results if r["name"] == name]
        for other in runs[1:]:
            print(f"{name}: {other['workers']:.0f} workers vs {runs[0]['workers']:.0f}: " + ", ".join(
                f"{k} x{other[f'{k}_mparams_per_s'] / runs[0][f'{k}_mparams_per_s']:.2f}"  # type: ignore[operator]
                for k in ("encrypt", "decrypt")))
        quantization = get_preset(name).quantization
        if quantization is not None:
            print(f"{name}: stated mean error bound {quantization.mean_error(args.sites, 1.0):.3g}")
    by_name = {r["name"]: r for r in results if r["workers"] == counts[0]}
    if {"default", "nvflare"} <= by_name.keys():
        d, n = by_name["default"], by_name["nvflare"]
        for clock in ("", "_cpu"):
            ratios = {k: d[f"{k}{clock}_mparams_per_s"] / n[f"{k}{clock}_mparams_per_s"]  # type: ignore[operator]
                      for k in ("encrypt", "aggregate")}
            print(f"default vs nvflare ({'CPU' if clock else 'wall'} time): "
                  + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items())
                  + f", bytes x{d['bytes_per_param'] / n['bytes_per_param']:.2f}")  # type: ignore[operator]
    if args.json:
        args.json.write_text(json.dumps({
            "params": args.params, "sites": args.sites, "repeat": args.repeat,
            "thread_probe": probe,
            "cpus": os.cpu_count(), "load_average_1min": [load_before[0], load_after[0]],
            "results": results}, indent=2))


if __name__ == "__main__":
    main()

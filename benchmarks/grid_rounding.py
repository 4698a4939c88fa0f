"""What exact aggregation rests on and costs: CKKS decode error per preset, grid rounding time.

    python benchmarks/grid_rounding.py --sites 1 10 100 --params 1000000 --json OUT.json

Decode error: for each preset, `--sites` updates of one full ciphertext of N(0, 1/K) values
are encrypted, summed as the aggregator sums them and decrypted; the largest and the standard
deviation of |decrypted - exact| are what `fixed_point.STEP` must stay well above (the grid
recovers the exact sum while the error is below STEP / 2). Cost: the site-side rounding
(`on_grid`) and snapping (`snap`) of `--params` values, fastest of `--repeat` runs, against the
encryption of the same update.
"""

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tenseal as ts

from fedhealth.core import fixed_point
from fedhealth.core.crypto.codec import decrypt_vector, encrypt_update, encrypt_vector
from fedhealth.core.crypto.keys import SiteKey, init_key_files, load_site_context
from fedhealth.core.crypto.presets import PRESETS


def decode_error(key: SiteKey, sites: int, seed: int = 0) -> dict[str, float]:
    """max and std of |decrypted sum - exact sum| over one ciphertext summed from `sites`."""
    size = key.preset.values_per_ciphertext
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, 1.0 / sites, size) for _ in range(sites)]
    total: ts.CKKSVector | None = None
    for update in updates:
        vector = ts.ckks_vector_from(key.context, encrypt_vector(key, update)[0])
        total = vector if total is None else total + vector
    assert total is not None
    error = np.abs(decrypt_vector(key, [total.serialize()], size) - np.sum(updates, axis=0))
    return {"max": float(error.max()), "std": float(error.std())}


def fastest_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, object] = {"step": fixed_point.STEP,
                                  "off_grid_tolerance": fixed_point.OFF_GRID_TOLERANCE}
    errors: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in PRESETS:
            init_key_files(Path(tmp) / name, name)
            key = load_site_context(Path(tmp) / name / "site.ctx")
            errors[name] = {k: decode_error(key, k) for k in args.sites}
            for k, e in errors[name].items():
                print(f"{name:8s} {k:4d} sites: max |error| {e['max']:.3g}, std {e['std']:.3g}, "
                      f"STEP/2 is {fixed_point.STEP / 2 / e['max']:.0f}x the max")
        key = load_site_context(Path(tmp) / "default" / "site.ctx")
        vector = np.random.default_rng(1).normal(size=args.params).astype(np.float32)
        tensors = {"w": vector}
        cost = {
            "on_grid_ms": fastest_ms(lambda: fixed_point.on_grid(vector, 0.3), args.repeat),
            "snap_ms": fastest_ms(lambda: fixed_point.snap(fixed_point.on_grid(vector, 0.3)),
                                  args.repeat),
            "encrypt_update_ms": fastest_ms(lambda: encrypt_update(key, tensors, 0.3), 1),
        }
    cost["snap_ms"] -= cost["on_grid_ms"]  # snap's own share
    print(f"{args.params} params: on_grid {cost['on_grid_ms']:.1f} ms, snap "
          f"{cost['snap_ms']:.1f} ms, encrypt_update (default, including on_grid) "
          f"{cost['encrypt_update_ms']:.0f} ms")
    results.update(decode_error=errors, params=args.params, **cost)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""An encrypted 3D federation in Flower's simulation: three synthetic CT hospitals, a 3D model
trained on their volumes under FedBN and FedAvg, CKKS-encrypted aggregation, two rounds."""

import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedhealth.app.simulation import local_superlink, simulate
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.keys import init_key_files
from fedhealth.core.synth.ct_federation import synthesize_ct

SITES = ("hospital-1", "hospital-2", "hospital-3")


@pytest.mark.slow
def test_an_encrypted_3d_federation_runs_fedbn_and_fedavg(tmp_path: Path) -> None:
    synthesize_ct(tmp_path / "data", len(SITES), 0, series_per_site=5, image_size=16)
    init_key_files(tmp_path / "keys", sites=list(SITES))
    base = RunConfig(num_server_rounds=2, encrypted=True, model="tiny-3d", image_size=32,
                     volume_depth=32, local_epochs=1, batch_size=4,
                     data_dir=str(tmp_path / "data"), key_dir=str(tmp_path / "keys"),
                     state_dir=str(tmp_path / "state"))
    seconds = {}
    with local_superlink() as link:
        for policy in ("fedbn", "fedavg"):
            started = time.perf_counter()
            results = simulate(replace(base, policy=policy, out_dir=str(tmp_path / policy)),
                               superlink=link)
            seconds[policy] = time.perf_counter() - started
            assert set(results["evaluate_by_round"]) == {"0", "1", "2"}
            assert set(results["evaluate_by_round"]["2"]) == set(SITES)  # decrypted everywhere
            assert set(results["per_site"]) == set(SITES)
            assert results["encrypted"] is True
    print(f"encrypted 3D federation, 3 sites x 2 rounds: {seconds}")


def test_compare_baselines_train_a_3d_model_on_the_sites_volumes(tmp_path: Path) -> None:
    from fedhealth.app.compare import run_baseline
    from sites.dataset import load_site, volume_depth_of

    synthesize_ct(tmp_path, len(SITES), 1, series_per_site=5, image_size=16)
    config = RunConfig(num_server_rounds=1, model="tiny-3d", image_size=32, volume_depth=32,
                       local_epochs=1, batch_size=4)
    sites = [load_site(tmp_path / name, image_size=config.image_size,
                       volume_depth=volume_depth_of(config)) for name in SITES]
    assert all(site.train[0]["image"].shape == (1, 32, 32, 32) for site in sites)
    for name in ("local", "pooled"):
        run = run_baseline(name, sites, config)
        assert set(run["per_site"]) == set(SITES)  # type: ignore[arg-type]
        assert all(0 <= m["balanced_accuracy"] <= 1 for m in run["per_site"].values())  # type: ignore[attr-defined]

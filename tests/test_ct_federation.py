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

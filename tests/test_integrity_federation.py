"""Signed replies and checked globals in a whole federation: Flower's simulation engine, the real
ClientApp and ServerApp, signing keys from `init_key_files(sites=...)` as `compare` writes them."""

from pathlib import Path

from fedhealth.app.simulation import simulate
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.keys import init_key_files
from fedhealth.core.crypto.signing import public_key_path
from fedhealth.core.synth import synthesize_federation


def test_signed_encrypted_federation_accepts_every_reply_and_every_global(tmp_path: Path) -> None:
    synthesize_federation(tmp_path / "data", 2, seed=3, images_per_site=24)
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    init_key_files(tmp_path / "keys", sites=names)
    assert all(public_key_path(tmp_path / "keys", n).exists() for n in names)
    config = RunConfig(num_server_rounds=2, policy="fedavg", model="tiny", local_epochs=1,
                       seed=0, data_dir=str(tmp_path / "data"), key_dir=str(tmp_path / "keys"),
                       out_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"))
    results = simulate(config)
    assert results["rejected"] == []  # every train, evaluate and census reply verified
    assert set(results["per_site"]) == set(names)
    for name in names:  # round 2 decrypted and checked the global of round 1, and kept it
        assert list((tmp_path / "state" / name / "accepted-global" / name).glob("run-*.npz"))

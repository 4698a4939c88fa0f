"""Key files: modes, fingerprints, refusals, and loading in another process."""

import multiprocessing
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.core.crypto.keyfile import KeyFileError, params_only
from fedhealth.core.crypto.keys import (
    AGGREGATOR_FILE,
    SITE_FILE,
    SigningKey,
    init_key_files,
    load_aggregator_context,
    load_site_context,
)
from fedhealth.core.crypto.presets import CkksPreset, HeadroomError, get_preset
from fedhealth.core.crypto.signing import ReplyFacts, ReplyVerifier, SignatureError


def test_site_file_is_private_and_aggregator_file_has_no_keys(key_dir: Path) -> None:
    assert stat.S_IMODE((key_dir / SITE_FILE).stat().st_mode) == 0o600
    aggregator = load_aggregator_context(key_dir / AGGREGATOR_FILE)
    assert not aggregator.context.has_secret_key()
    assert not aggregator.context.has_relin_keys() and not aggregator.context.has_galois_keys()
    assert (key_dir / AGGREGATOR_FILE).stat().st_size < 400  # parameters only


def test_both_files_share_a_fingerprint_unique_per_federation(key_dir: Path,
                                                              tmp_path: Path) -> None:
    site = load_site_context(key_dir / SITE_FILE)
    aggregator = load_aggregator_context(key_dir / AGGREGATOR_FILE)
    assert site.fingerprint == aggregator.fingerprint
    assert params_only(site.context) == params_only(aggregator.context)
    assert init_key_files(tmp_path) != site.fingerprint


def test_loaders_refuse_the_wrong_file(key_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="holds a secret key"):
        load_aggregator_context(key_dir / SITE_FILE)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        load_site_context(key_dir / AGGREGATOR_FILE)
    (tmp_path / "junk.ctx").write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not a fedhealth key file"):
        load_site_context(tmp_path / "junk.ctx")
    truncated = (key_dir / SITE_FILE).read_bytes()[:5000]
    (tmp_path / "cut.ctx").write_bytes(truncated)
    with pytest.raises(KeyFileError, match="cut.ctx"):
        load_site_context(tmp_path / "cut.ctx")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_site_context(tmp_path / "missing.ctx")


def test_init_refuses_to_overwrite(key_dir: Path) -> None:
    with pytest.raises(FileExistsError, match="--force"):
        init_key_files(key_dir)


def _fingerprint_in_child(path: str, queue: multiprocessing.Queue) -> None:
    queue.put(load_site_context(path).fingerprint)


def test_keys_load_in_another_process_and_pickle(key_dir: Path) -> None:
    import pickle

    site = load_site_context(key_dir / SITE_FILE)
    copy = pickle.loads(pickle.dumps(site))
    assert copy.fingerprint == site.fingerprint and copy.context.has_secret_key()
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_fingerprint_in_child, args=(str(key_dir / SITE_FILE), queue))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == site.fingerprint


def test_presets_and_headroom() -> None:
    assert get_preset("default").data_level_bits == 60
    assert get_preset("nvflare").data_level_bits == 100
    with pytest.raises(ValueError, match="default, nvflare"):
        get_preset("nope")
    get_preset("default").check_headroom(1e5)
    with pytest.raises(HeadroomError, match="overflow"):
        get_preset("default").check_headroom(2.0**19)
    with pytest.raises(HeadroomError, match="no room"):
        CkksPreset("bad", 4096, (40, 40), 40)
    with pytest.raises(HeadroomError, match="not finite"):
        get_preset("default").check_headroom(float(np.nan))


def test_keys_init_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "init", "--out", str(tmp_path), "--preset", "nvflare"])
    assert result.exit_code == 0, result.output
    fingerprint = result.output.split("fingerprint")[1].split()[0]
    assert load_aggregator_context(tmp_path / AGGREGATOR_FILE).fingerprint == fingerprint
    again = CliRunner().invoke(app, ["keys", "init", "--out", str(tmp_path)])
    assert again.exit_code == 1 and "--force" in again.output


def test_keys_init_writes_signing_keys_for_simulated_sites(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["keys", "init", "--out", str(tmp_path),
                                      "--sites", "hospital-1, hospital-2"])
    assert result.exit_code == 0, result.output
    for site in ("hospital-1", "hospital-2"):
        private = tmp_path / "node-keys" / f"{site}.key"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        signer = SigningKey.load(private, site)
        facts = ReplyFacts("train", "t", 1, "n", site, "", 5, 0.5)
        ReplyVerifier.from_key_dir(tmp_path).verify(facts, signer.sign(facts))  # type: ignore[union-attr]
    with pytest.raises(SignatureError, match="not hospital-2's"):
        ReplyVerifier.from_key_dir(tmp_path).verify(  # type: ignore[union-attr]
            ReplyFacts("train", "t", 1, "n", "hospital-2", "", 5, 0.5),
            SigningKey.load(tmp_path / "node-keys" / "hospital-1.key", "hospital-1").sign(
                ReplyFacts("train", "t", 1, "n", "hospital-1", "", 5, 0.5)))


def test_key_file_without_checksum_is_refused_with_the_fix(key_dir: Path, tmp_path: Path) -> None:
    raw = (key_dir / SITE_FILE).read_bytes()
    old = raw.replace(b"fedhealth-ckks-key/2\n", b"fedhealth-ckks-key/1\n", 1)[:-83]
    path = tmp_path / "old.ctx"
    path.write_bytes(old)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"old.ctx: a key file of format 1.*keys init"):
        load_site_context(path)


def test_site_names_cannot_lead_key_files_out_of_their_folder(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="cannot name a key file"):
        init_key_files(tmp_path, sites=["../outside"])
    assert not (tmp_path / "outside.key").exists() and not (tmp_path / SITE_FILE).exists()

"""Shared fixtures, written once per test session: a small synthetic federation and one
federation's CKKS key files. Both are read-only for tests."""

from pathlib import Path

import pytest

from fedhealth.core.crypto.keys import SiteKey, init_key_files, load_site_context
from fedhealth.core.synth import synthesize_federation

SYNTH_SITES, SYNTH_IMAGES, SYNTH_SIZE, SYNTH_SEED = 3, 40, 64, 11


@pytest.fixture(scope="session")
def synth_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-site federation (64 px, 40 images per site, scanner shift and label skew on).

    Read-only for tests: copy a site before changing it.
    """
    root = tmp_path_factory.mktemp("federation")
    synthesize_federation(root, SYNTH_SITES, SYNTH_SEED, images_per_site=SYNTH_IMAGES,
                          image_size=SYNTH_SIZE)
    return root


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`site.ctx` and `aggregator.ctx` of one federation (default preset)."""
    directory = tmp_path_factory.mktemp("keys")
    init_key_files(directory)
    return directory


@pytest.fixture(scope="session")
def site_key(key_dir: Path) -> SiteKey:
    return load_site_context(key_dir / "site.ctx")

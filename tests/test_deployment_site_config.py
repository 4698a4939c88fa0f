"""site.toml and `fedhealth site start`: every bad input stops the site with a message naming it."""

import shutil
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.deployment.bundles import init_federation
from fedhealth.app.deployment.site_config import SiteConfigError, load_site_config, preflight
from fedhealth.core.synth.federation import synthesize_federation


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    synthesize_federation(root / "data", sites=2, seed=3, images_per_site=8)
    init_federation("t", ["a", "b"], "127.0.0.1:9093", root / "fed")
    toml = root / "fed" / "a" / "site.toml"
    toml.write_text(toml.read_text().replace('data-dir = ""',
                                             f'data-dir = "{root / "data" / "hospital-1"}"'))
    return root


@pytest.fixture()
def site(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of site a's bundle, ready to be damaged by one test."""
    shutil.copytree(pristine / "fed" / "a", tmp_path / "a")
    return tmp_path / "a"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_valid_site_passes_and_node_config_reaches_flower(site: Path, pristine: Path) -> None:
    config = load_site_config(site / "site.toml")
    assert config.node_private_key == site / "node.key" and config.runtime_port == 9094
    report = preflight(config)
    assert report.images > 0 and config.state_dir.is_dir()
    node_config = parse_config_args([config.node_config()])
    assert node_config == {"site-name": "a", "data-dir": str(pristine / "data" / "hospital-1"),
                           "state-dir": str(site / "state"), "key-file": str(site / "site.ctx"),
                           "audit-log": str(site / "audit.jsonl"),
                           "node-key": str(site / "node.key")}


@pytest.mark.parametrize("damage, message", [
    (lambda s: _edit(s / "site.toml", 'data-dir = "', 'data-dir = "/nonexistent'),
     "data-dir"),
    (lambda s: _edit(s / "site.toml", "[superlink]\naddress", "[superlink]\nadres"),
     r"\[superlink\] address is not set"),
    (lambda s: _edit(s / "site.toml", "runtime-port = 9094", 'runtime-port = "x"'),
     "runtime-port must be a int"),
    (lambda s: (s / "site.toml").write_text("[site\n"), "not valid TOML"),
    (lambda s: (s / "ca.pem").unlink(), "ca.pem' does not exist"),
    (lambda s: (s / "ca.pem").write_text("garbage"), "not a PEM certificate"),
    (lambda s: (s / "node.key").chmod(0o644), "permissions 0644"),
    (lambda s: (s / "site.ctx").chmod(0o640), "permissions 0640"),
    (lambda s: (s / "node.key").write_text("garbage"), "not an unencrypted OpenSSH key"),
])
def test_bad_site_fails_with_named_reason(site: Path, damage, message: str) -> None:
    damage(site)
    with pytest.raises(SiteConfigError, match=message):
        preflight(load_site_config(site / "site.toml"))


def test_superlink_certificate_is_not_a_ca(site: Path, pristine: Path) -> None:
    shutil.copyfile(pristine / "fed" / "coordinator" / "superlink.pem", site / "ca.pem")
    with pytest.raises(SiteConfigError, match="not a CA certificate"):
        preflight(load_site_config(site / "site.toml"))


def test_aggregator_context_is_refused_as_site_key(site: Path, pristine: Path) -> None:
    shutil.copyfile(pristine / "fed" / "coordinator" / "keys" / "aggregator.ctx",
                    site / "site.ctx")
    (site / "site.ctx").chmod(0o600)
    with pytest.raises(SiteConfigError, match="no secret key"):
        preflight(load_site_config(site / "site.toml"))


def test_site_start_fails_fast_before_any_connection(site: Path) -> None:
    (site / "node.key").chmod(0o644)
    result = CliRunner().invoke(app, ["site", "start", "--config", str(site / "site.toml")])
    assert result.exit_code == 2
    assert not (site / "state").exists()  # stopped before the preflight's end, nothing started
    assert "chmod 600" in " ".join(result.output.split())  # names the fix (console-wrapped)

"""`fedhealth site approve` and the approved list in site.toml (sites.app_approval).

The hash approved from a folder must be the one Flower computes for what `flwr build` (and so
`flwr run`) makes of that folder; the list must survive being edited around hospital IT's
comments; a malformed list stops `site start` by name, and the gate treats an unreadable one as
approving nothing. The gate's refusal itself runs end to end in tests/test_deployment_e2e.py.
"""

import hashlib
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.deployment.bundles import site_toml
from fedhealth.app.deployment.site_config import SiteConfigError, load_site_config
from fedhealth.app.flower_cli import executable
from sites.app_approval import AppApprovalError, approve, approved_apps, fab_bytes, fab_sha256
from sites.app_gate import AppGate

PYPROJECT = '''[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
'''


@pytest.fixture()
def tiny_app(tmp_path: Path) -> Path:
    folder = tmp_path / "tinyapp"
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text("app = None\n")
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return folder


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml("f", "a", "127.0.0.1:9093").replace('data-dir = ""',
                                                                    'data-dir = "data"'))
    return path


def test_folder_is_hashed_as_flwr_build_bundles_it(tiny_app: Path, tmp_path: Path) -> None:
    out = tmp_path / "built"
    out.mkdir()
    subprocess.run([executable("flwr"), "build", "--app", str(tiny_app)], cwd=out, check=True,
                   capture_output=True)
    (fab,) = out.glob("*.fab")
    built_hash = hashlib.sha256(fab.read_bytes()).hexdigest()
    assert fab_sha256(fab_bytes(tiny_app)) == fab_sha256(fab_bytes(fab)) == built_hash
    assert built_hash[:8] in fab.name  # Flower names the file after the same hash

    (tiny_app / "tinyapp" / "client.py").write_text("app = None  # one changed line\n")
    assert fab_sha256(fab_bytes(tiny_app)) != built_hash


def test_approve_adds_the_hash_once_and_keeps_the_comments(tiny_app: Path, config: Path) -> None:
    before = config.read_text()
    runner = CliRunner()
    first = runner.invoke(app, ["site", "approve", str(tiny_app), "--config", str(config)])
    assert first.exit_code == 0, first.output
    fab_hash = first.stdout.split()[0]
    assert fab_hash == fab_sha256(fab_bytes(tiny_app))
    again = runner.invoke(app, ["site", "approve", str(tiny_app), "--config", str(config)])
    assert again.exit_code == 0 and "already approved" in again.output
    assert config.read_text().startswith(before)  # every field and comment as it was
    assert load_site_config(config).approved_apps == approved_apps(config) == {fab_hash}

    other = "ab" * 32
    assert approve(config, other) and not approve(config, other)
    assert load_site_config(config).approved_apps == {fab_hash, other}


def test_approving_a_missing_app_names_it(config: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["site", "approve", str(tmp_path / "nope.fab"),
                                      "--config", str(config)])
    assert result.exit_code == 2 and "nope.fab" in result.output
    assert approved_apps(config) == frozenset()


@pytest.mark.parametrize("approved, message", [
    ('approved = ["not-a-hash"]', r"\[apps\] approved holds 'not-a-hash', not a sha256"),
    (f'approved = ["{"AB" * 32}"]', "not a sha256 hash"),  # Flower's hashes are lowercase
    (f'approved = "{"ab" * 32}"', r"\[apps\] approved must be a list"),
])
def test_malformed_list_stops_the_site_by_name(config: Path, approved: str, message: str) -> None:
    config.write_text(config.read_text() + f"\n[apps]\n{approved}\n")
    with pytest.raises(SiteConfigError, match=message) as raised:
        load_site_config(config)
    assert str(config) in str(raised.value)
    with pytest.raises(AppApprovalError, match=message):
        approve(config, "cd" * 32)  # a malformed list is not extended either


def test_gate_approves_nothing_while_site_toml_is_unreadable(config: Path, tmp_path: Path) -> None:
    approve(config, "ab" * 32)
    gate = AppGate("127.0.0.1:1", config, "a", tmp_path / "audit.jsonl")
    assert gate.approved() == {"ab" * 32}
    config.write_text("[apps\n")
    assert gate.approved() == frozenset()
    config.unlink()
    assert gate.approved() == frozenset()

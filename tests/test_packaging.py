"""One packaging, three contexts: editable (these tests), a wheel, and a Flower App Bundle.

The apps must import from the built artefact itself, not from this checkout.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a Flower App Bundle and runs them

ROOT = Path(__file__).resolve().parents[1]
APPS = ("fedhealth.app.server_app", "sites.client_app", "strategies.encrypted_fedavg",
        "fedhealth.app.cli")
PACKAGES = {"fedhealth", "sites", "strategies"}


def _import_from(folder: Path) -> list[str]:
    """Where each app module is loaded from, with `folder` first on the path."""
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
            f"print('\\n'.join(importlib.import_module(m).__file__ for m in {APPS!r}))")
    return subprocess.run([sys.executable, "-c", code, str(folder)], check=True,
                          capture_output=True, text=True, cwd=folder).stdout.split()


def _unpack(archive: Path, into: Path) -> list[str]:
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(into)
        return bundle.namelist()


def test_flower_app_bundle_holds_only_the_code_and_runs_from_itself(tmp_path: Path) -> None:
    subprocess.run([str(Path(sys.executable).with_name("flwr")), "build", "--app", str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (fab,) = tmp_path.glob("*.fab")
    names = _unpack(fab, tmp_path / "fab")
    top = {name.split("/")[0] for name in names}
    assert top == PACKAGES | {"pyproject.toml", ".info"}
    assert not [n for n in names if n.endswith((".ctx", ".key", ".pem", ".json", ".jsonl"))]
    assert all(path.startswith(str(tmp_path / "fab")) for path in _import_from(tmp_path / "fab"))


def test_wheel_holds_the_three_packages_and_runs_from_itself(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "--quiet", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fedhealth-*.whl")
    names = _unpack(wheel, tmp_path / "wheel")
    assert {n.split("/")[0] for n in names if n.endswith(".py")} == PACKAGES
    assert all(path.startswith(str(tmp_path / "wheel"))
               for path in _import_from(tmp_path / "wheel"))

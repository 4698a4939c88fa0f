"""The folders tell the story, checked by import-linter over every module of the three packages.

`lint-imports` reads the contracts in pyproject.toml ([tool.importlinter]). The second test proves the
contracts can fail: the same check over a copy of the tree with one forbidden import added.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("fedhealth", "sites", "strategies")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": ""})


def test_import_contracts_hold() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "line"), [
    ("fedhealth/core/models.py", "import sites.training"),
    ("sites/audit.py", "import strategies.checkpoint"),
    ("strategies/checkpoint.py", "import fedhealth.core.crypto.keys"),
    ("strategies/reply_check.py", "import fedhealth.app.server_app"),
    ("fedhealth/stray.py", "import fedhealth.core.config"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout

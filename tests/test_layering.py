"""The folders tell the story: sites/ and strategies/ never reach each other; the core reaches neither.

Checked on the real, transitive import graph in a clean interpreter, so an indirect import
through a shared module counts too.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("fedhealth.config", "fedhealth.crypto.aggregator_key", "fedhealth.crypto.messages",
        "fedhealth.models", "fedhealth.personalization", "fedhealth.synth",
        "fedhealth.run_history")


def _modules(folder: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                  for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py")


def _loaded_by(modules: list[str]) -> set[str]:
    code = f"import sys, {', '.join(modules)}; print('\\n'.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True, cwd=ROOT).stdout.split())


def _under(package: str, loaded: set[str]) -> set[str]:
    return {m for m in loaded if m == package or m.startswith(package + ".")}


@pytest.mark.parametrize(("folder", "forbidden"), [("sites", "strategies"),
                                                   ("strategies", "sites")])
def test_site_and_aggregator_code_never_import_each_other(folder: str, forbidden: str) -> None:
    modules = _modules(folder)
    assert modules, f"no modules found under {folder}/"
    loaded = _loaded_by(modules)
    assert set(modules) <= loaded  # the probe really imported them
    assert not _under(forbidden, loaded), f"{folder}/ pulls in {sorted(_under(forbidden, loaded))}"


def test_shared_core_imports_neither_side() -> None:
    loaded = _loaded_by(list(CORE))
    assert not _under("sites", loaded) and not _under("strategies", loaded)

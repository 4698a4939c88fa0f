"""`fedhealth --help` answers without loading the heavy libraries the commands use.

Each check runs in a fresh interpreter: this test process has long imported torch itself.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "monai", "tenseal", "flwr", "ray", "pydicom", "matplotlib")
LOADED = ("import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
          f"set({HEAVY!r}))))")


def _heavy_modules_after(code: str) -> list[str]:
    """Run `code` in a new interpreter, then list the heavy top-level packages it loaded."""
    done = subprocess.run([sys.executable, "-c", f"{code}\n{LOADED}"], check=True,
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library() -> None:
    assert _heavy_modules_after("import fedhealth.app.cli") == []


@pytest.mark.parametrize("argv", [["--help"], ["site", "check", "--help"], ["site", "start", "--help"],
                                  ["keys", "init", "--help"], ["federation", "run", "--help"],
                                  ["compare", "--help"], ["synth", "--help"]], ids=" ".join)
def test_help_exits_0_without_loading_a_heavy_library(argv: list[str]) -> None:
    code = ("import contextlib, io, sys\nfrom fedhealth.app.cli import app\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        app({argv!r})\n"
            "    except SystemExit as exit:\n        assert exit.code == 0, exit.code")
    assert _heavy_modules_after(code) == []


def test_the_installed_fedhealth_command_prints_help() -> None:
    done = subprocess.run([str(Path(sys.executable).with_name("fedhealth")), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {"synth", "site", "keys", "federation", "compare"} <= set(done.stdout.split())

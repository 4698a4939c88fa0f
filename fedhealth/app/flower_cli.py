"""Flower's own executables driven from Python: `flwr` against one SuperLink, and the
long-lived Flower processes fedhealth starts, each stopped with everything it spawned.

The deployment commands (a TLS SuperLink at the coordinator) and the simulation (a SuperLink of
its own in simulation mode) both submit runs, follow their logs and read their status through
`FlwrCli`; Flower's CLI output is parsed here only. Every `flwr` call gets a private FLWR_HOME
holding one named connection, so a user's own ~/.flwr is never read or changed.
"""

import atexit
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.common.config import parse_config_args

from fedhealth.core.config import RunConfig

# `flwr ls` status of a run that ended well; anything else `finished:*` is a failure.
COMPLETED = "finished:completed"
# Terminal colours Flower's logs and Rich's JSON carry when something forces them (a notebook)
ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


class FlowerError(RuntimeError):
    """A Flower process could not be started, reached, or told what to do."""


def executable(name: str) -> str:
    """A Flower executable from this Python's environment (falls back to PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FlowerError(f"'{name}' not found: install fedhealth (it brings flwr) in this "
                          "environment")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: their FLWR_HOME, and this environment's executables
    first on PATH (SuperLink and SuperNode spawn `flower-superexec` by name)."""
    bin_dir = str(Path(executable("flower-superexec")).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "NO_COLOR": "1",  # output read by programs
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    env.pop("FORCE_COLOR", None)
    return env


def default_app_dir() -> Path:
    """The fedhealth project folder: the Flower App `flwr run` bundles (a wheel has none)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FlowerError(f"no pyproject.toml in {root}: `flwr run` needs the fedhealth project "
                          "folder (a checkout or an unpacked source archive); pass its path")
    return root


def unpack_app(fab: bytes, folder: Path) -> Path:
    """The app folder a FAB holds (without the manifest Flower adds when it builds one)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        bundle.extractall(folder, [n for n in bundle.namelist() if not n.startswith(".info/")])
    return folder


@lru_cache(maxsize=1)
def staged_app_dir() -> Path:
    """The project folder as Flower bundles it, unpacked once per process.

    `flwr run` on a checkout walks every file under it, the virtualenv included, before it
    filters by `fab-include` (about 4 s a run); on this copy it reads the app's files only. The
    copy is taken when first asked for, so one process runs one version of the app throughout.
    """
    from flwr.cli.build import build_fab_from_disk

    folder = Path(tempfile.mkdtemp(prefix="fedhealth-app-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return unpack_app(build_fab_from_disk(default_app_dir()), folder)


def submitted_run_config(app_dir: Path, overrides: Sequence[str]) -> RunConfig:
    """The RunConfig the ServerApp will build from the app's defaults and `--run-config`
    overrides, built now: a typo or a value out of range fails before anything is submitted."""
    path = app_dir / "pyproject.toml"
    try:
        pyproject = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise FlowerError(f"cannot read the app's {path}: {err}") from err
    defaults = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return RunConfig.from_flower({**defaults, **parse_config_args(list(overrides))})


@dataclass(frozen=True)
class FlwrCli:
    """The `flwr` CLI pointed at one SuperLink through a connection in a private FLWR_HOME.

    root_certificates: the CA to verify the SuperLink with; None means plain HTTP, which only
        a SuperLink on 127.0.0.1 that fedhealth started itself (simulation) may use.
    """

    home: Path
    connection: str
    address: str
    root_certificates: Path | None = None

    def env(self) -> dict[str, str]:
        """Write the connection into FLWR_HOME/config.toml; the environment that reads it."""
        self.home.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.root_certificates}"\n'
                    if self.root_certificates else "insecure = true\n")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
            f'address = "{self.address}"\n{security}')
        return flower_env(self.home)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start `flwr ARGS --format json` (its reply is read with `reply`)."""
        return subprocess.Popen([executable("flwr"), *args, "--format", "json"], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def call(self, *args: str, timeout: float = 120) -> dict[str, object]:
        """`flwr ARGS` and its JSON reply."""
        return reply(self.start(*args), timeout)

    def submit(self, app_dir: Path, run_config: Sequence[str],
               federation_config: Sequence[str] = (), timeout: float = 300) -> int:
        """`flwr run APP` with run config overrides (strings, or one TOML file); the run id."""
        args = ["run", str(app_dir), self.connection]
        for override in run_config:
            args += ["--run-config", override]
        for override in federation_config:
            args += ["--federation-config", override]
        answer = self.call(*args, timeout=timeout)
        if not answer.get("success"):
            raise FlowerError(f"the SuperLink at {self.address} refused the run: "
                              f"{answer.get('error-message')}")
        return int(str(answer["run-id"]))

    def status(self, run_id: int) -> str:
        """Flower's status of a run: pending, starting, running, finished:completed|failed|..."""
        runs = self.call("ls", self.connection, "--run-id", str(run_id)).get("runs")
        if not isinstance(runs, list) or not runs:
            raise FlowerError(f"run {run_id} is unknown to the SuperLink at {self.address}")
        return str(runs[0]["status"])

    def stream_log(self, run_id: int) -> Iterator[str]:
        """Lines of the run's log (ServerApp and simulation) as they arrive, until it ends."""
        with subprocess.Popen([executable("flwr"), "log", str(run_id), self.connection,
                               "--stream"], env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as process:
            assert process.stdout is not None
            try:
                yield from process.stdout
            finally:
                process.terminate()


def reply(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    """The JSON a `flwr ... --format json` process printed (the CLI may print text before it)."""
    args = process.args
    command = " ".join(map(str, args)) if isinstance(args, list | tuple) else str(args)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise FlowerError(f"`{command}` did not finish in {timeout:.0f} s") from None
    stdout = ANSI_STYLE.sub("", stdout)
    start = stdout.find("{")
    try:
        answer = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if not isinstance(answer, dict) or not answer:
        raise FlowerError(f"`{command}` failed: {stderr.strip() or stdout}")
    return answer


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 20) -> None:
    """Stop a process started with `start_new_session=True` and everything in its session's
    process group (Flower's SuperExec, ServerApp and simulation processes): SIGTERM, then
    SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its group may not be
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return

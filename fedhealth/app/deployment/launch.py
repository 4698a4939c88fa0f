"""Command lines and helpers that drive Flower's own deployment tools.

We never reimplement Flower's transport: the SuperLink, SuperNodes and runs are Flower's
`flower-superlink`, `flower-supernode` and `flwr` executables, started with TLS and node
authentication always on. The `flwr` CLI is pointed at the coordinator's SuperLink through a
private FLWR_HOME inside the coordinator folder, so a user's own ~/.flwr is never touched.
"""

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from fedhealth.app.deployment.bundles import CoordinatorBundle, split_address
from fedhealth.app.deployment.site_config import SiteConfig

CONNECTION = "fedhealth"
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


class LaunchError(RuntimeError):
    """A Flower process could not be started, reached, or told what to do."""


def executable(name: str) -> str:
    """A Flower executable from this Python's environment (falls back to PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise LaunchError(f"'{name}' not found: install fedhealth (it brings flwr) in this "
                          "environment")
    return found


def flwr_home(bundle: CoordinatorBundle) -> Path:
    """The coordinator's private FLWR_HOME, with a config.toml naming its SuperLink."""
    home = bundle.root / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{bundle.superlink}"\nroot-certificates = "{bundle.ca_cert}"\n')
    return home


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: their FLWR_HOME, and this environment's executables
    first on PATH (SuperLink and SuperNode spawn `flower-superexec` by name)."""
    bin_dir = str(Path(executable("flower-superexec")).parent)
    return {**os.environ, "FLWR_HOME": str(home),
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def coordinator_env(bundle: CoordinatorBundle) -> dict[str, str]:
    return flower_env(flwr_home(bundle))


def superlink_command(bundle: CoordinatorBundle, bind_host: str = "0.0.0.0") -> list[str]:
    """`flower-superlink` with TLS, SuperNode auth and a persistent state database.

    Runtime dependency installation is off: the ServerApp runs in this environment, and the
    coordinator never `uv sync`s packages a submitted app asks for.
    """
    _, port = split_address(bundle.superlink)
    (bundle.root / "state").mkdir(exist_ok=True)
    return [executable("flower-superlink"),
            "--ssl-ca-certfile", str(bundle.ca_cert),
            "--ssl-certfile", str(bundle.server_cert),
            "--ssl-keyfile", str(bundle.server_key),
            "--enable-supernode-auth",
            "--host", bind_host, "--port", str(port),
            "--database", str(bundle.root / "state" / "superlink.db"),
            "--disable-runtime-dependency-installation"]


def supernode_command(config: SiteConfig, max_wait_seconds: float | None = None) -> list[str]:
    """`flower-supernode` with TLS (the federation CA only) and node authentication."""
    command = [executable("flower-supernode"),
               "--superlink", config.superlink,
               "--root-certificates", str(config.ca_cert),
               "--auth-supernode-private-key", str(config.node_private_key),
               "--port", str(config.runtime_port),
               "--node-config", config.node_config()]
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    return command


def site_env(config: SiteConfig) -> dict[str, str]:
    """The SuperNode keeps its Flower home (installed apps) in the site's state folder."""
    return flower_env(config.state_dir / "flwr-home")


def wait_until_ready(address: str, ca_cert: Path, timeout: float,
                     process: subprocess.Popen | None = None) -> None:
    """Poll the SuperLink's /health over TLS (verifying it against the CA) until it answers."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LaunchError(f"the SuperLink exited with code {process.returncode} before "
                              "it was ready; see its log")
        try:
            if httpx.get(f"https://{address}/health", verify=context, timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise LaunchError(f"the SuperLink at {address} did not answer within {timeout:.0f} s")


def _flwr(bundle: CoordinatorBundle, *args: str) -> subprocess.Popen:
    """Start a `flwr` subcommand against the coordinator's SuperLink, with JSON output."""
    return subprocess.Popen([executable("flwr"), *args, "--format", "json"],
                            env=coordinator_env(bundle), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _json_reply(process: subprocess.Popen, timeout: float = 120) -> dict:
    """The JSON a `flwr ... --format json` process printed (the CLI may print text before it)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise LaunchError(f"`{' '.join(process.args)}` did not finish in {timeout:.0f} s") from None
    start = stdout.find("{")
    try:
        reply = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if not reply:
        raise LaunchError(f"`{' '.join(process.args)}` failed: {stderr.strip() or stdout}")
    return reply


def register_sites(bundle: CoordinatorBundle) -> dict[str, str]:
    """Register every site's public key with the SuperLink (in parallel); returns site -> node
    id or note. A key registered on an earlier start is kept (the state database remembers it).
    """
    pending = {site: _flwr(bundle, "supernode", "register", str(bundle.node_public_key(site)),
                           CONNECTION, "--name", site) for site in bundle.sites}
    registered = {}
    for site, process in pending.items():
        reply = _json_reply(process)
        if reply.get("success"):
            registered[site] = str(reply["node-id"])
        elif "already in use" in str(reply.get("error-message", "")):
            registered[site] = "already registered"
        else:
            raise LaunchError(f"registering site '{site}' failed: {reply.get('error-message')}")
    return registered


def run_overrides(bundle: CoordinatorBundle, extra: list[str]) -> list[str]:
    """Run config pointing the ServerApp at the coordinator's params-only key and results,
    waiting for every site of the bundle before round 0 (`extra` may override any of it)."""
    return [f'key-dir="{bundle.key_dir}" out-dir="{bundle.results_dir}" '
            f'expected-sites={len(bundle.sites)}', *extra]


def submit_run(bundle: CoordinatorBundle, app_dir: Path, overrides: list[str]) -> int:
    """`flwr run APP` with the run config; returns the run id."""
    bundle.results_dir.mkdir(exist_ok=True)
    args = ["run", str(app_dir), CONNECTION]
    for override in run_overrides(bundle, overrides):
        args += ["--run-config", override]
    reply = _json_reply(_flwr(bundle, *args), timeout=300)
    if not reply.get("success"):
        raise LaunchError(f"the SuperLink refused the run: {reply.get('error-message')}")
    return int(reply["run-id"])


def run_status(bundle: CoordinatorBundle, run_id: int) -> str:
    """Flower's status of a run: pending, starting, running, finished:completed|failed|..."""
    reply = _json_reply(_flwr(bundle, "ls", CONNECTION, "--run-id", str(run_id)))
    runs = reply.get("runs") or []
    if not runs:
        raise LaunchError(f"run {run_id} is unknown to the SuperLink")
    return str(runs[0]["status"])


def stream_log(bundle: CoordinatorBundle, run_id: int) -> Iterator[str]:
    """Lines of the run's log (ServerApp side) as they arrive, until the run ends."""
    with subprocess.Popen([executable("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                          env=coordinator_env(bundle), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        try:
            yield from process.stdout
        finally:
            process.terminate()


def default_app_dir() -> Path:
    """The fedhealth project folder (the Flower App `flwr run` bundles)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise LaunchError("cannot find the fedhealth app folder (pyproject.toml); pass --app")
    return root

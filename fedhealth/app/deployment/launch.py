"""Command lines and helpers that drive Flower's own deployment tools.

We never reimplement Flower's transport: the SuperLink, SuperNodes and runs are Flower's
`flower-superlink`, `flower-supernode` and `flwr` executables, started with TLS and node
authentication always on. The `flwr` CLI is pointed at the coordinator's SuperLink through a
private FLWR_HOME inside the coordinator folder, so a user's own ~/.flwr is never touched.
"""

import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fedhealth.app.deployment.bundles import CoordinatorBundle, split_address
from fedhealth.app.deployment.site_config import SiteConfig
from fedhealth.app.flower_cli import (
    FlowerError,
    FlwrCli,
    executable,
    flower_env,
    reply,
    submitted_run_config,
)

CONNECTION = "fedhealth"
RUNTIME_HOST = "127.0.0.1"  # the SuperNode's Runtime API: for this machine's processes only
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def coordinator_cli(bundle: CoordinatorBundle) -> FlwrCli:
    """`flwr` against the coordinator's SuperLink, verified with the federation CA."""
    return FlwrCli(bundle.root / "flwr-home", CONNECTION, bundle.superlink, bundle.ca_cert)


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
    """`flower-supernode` with TLS (the federation CA only) and node authentication.

    `--isolation process`: the SuperNode starts no ClientApp itself; `app_gate_command` is the
    one process that does, for approved apps only. Its Runtime API listens on 127.0.0.1.
    """
    command = [executable("flower-supernode"),
               "--superlink", config.superlink,
               "--root-certificates", str(config.ca_cert),
               "--auth-supernode-private-key", str(config.node_private_key),
               "--isolation", "process",
               "--host", RUNTIME_HOST, "--port", str(config.runtime_port),
               "--node-config", config.node_config()]
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    return command


def app_gate_command(config: SiteConfig, allow_any_app: bool = False) -> list[str]:
    """The site's SuperExec (sites.app_gate): Flower's ClientApp process for approved apps only,
    an error reply and an audit line for any other; it exits with `fedhealth site start`."""
    command = [sys.executable, "-m", "sites.app_gate",
               "--runtime-api-address", f"{RUNTIME_HOST}:{config.runtime_port}",
               "--site-config", str(config.source), "--site-name", config.name,
               "--audit-log", str(config.audit_log), "--parent-pid", str(os.getpid())]
    return [*command, "--allow-any-app"] if allow_any_app else command


def coordinator_env(bundle: CoordinatorBundle) -> dict[str, str]:
    """Environment of the coordinator's Flower processes (the SuperLink, `flwr`)."""
    return coordinator_cli(bundle).env()


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
            raise FlowerError(f"the SuperLink exited with code {process.returncode} before "
                              "it was ready; see its log")
        try:
            if httpx.get(f"https://{address}/health", verify=context, timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise FlowerError(f"the SuperLink at {address} did not answer within {timeout:.0f} s")


def register_sites(bundle: CoordinatorBundle) -> dict[str, str]:
    """Register every site's public key with the SuperLink (in parallel); returns site -> node
    id or note. A key registered on an earlier start is kept (the state database remembers it).
    """
    cli = coordinator_cli(bundle)
    pending = {site: cli.start("supernode", "register", str(bundle.node_public_key(site)),
                               CONNECTION, "--name", site) for site in bundle.sites}
    registered = {}
    for site, process in pending.items():
        answer = reply(process)
        if answer.get("success"):
            registered[site] = str(answer["node-id"])
        elif "already in use" in str(answer.get("error-message", "")):
            registered[site] = "already registered"
        else:
            raise FlowerError(f"registering site '{site}' failed: {answer.get('error-message')}")
    return registered


def run_overrides(bundle: CoordinatorBundle, extra: list[str]) -> list[str]:
    """Run config pointing the ServerApp at the coordinator's params-only key and results,
    waiting for every site of the bundle before round 0 (`extra` may override any of it)."""
    return [f'key-dir="{bundle.key_dir}" out-dir="{bundle.results_dir}" '
            f'expected-sites={len(bundle.sites)}', *extra]


def submit_run(bundle: CoordinatorBundle, app_dir: Path, overrides: list[str]) -> tuple[int, Path]:
    """`flwr run APP` with the run config, checked first (a ConfigError names the field); the
    run id and the folder its results go to (the bundle's, unless `overrides` set out-dir)."""
    run_config = run_overrides(bundle, overrides)
    results_dir = Path(submitted_run_config(app_dir, run_config).out_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    return coordinator_cli(bundle).submit(app_dir, run_config), results_dir

"""Run a federation in Flower's simulation engine (tests, `compare`, the demo, notebooks,
`fedhealth simulate`), leaving no process behind.

Flower 1.42 deprecates `run_simulation`; its replacement is `flwr run` against a SuperLink in
simulation mode. On its default `local` connection `flwr run .` starts that SuperLink itself,
detached, on fixed ports (39091/39093), and leaves it running after the run. Here a
`local_superlink()` block starts one of its own on a free port with a private FLWR_HOME, and stops
it, with the ServerApp and simulation processes it spawned, when the block ends. The ServerApp and
ClientApps are the ones `flwr run` ships in the app bundle, exactly as in a deployment.
"""

import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import psutil

from fedhealth.app.flower_cli import (
    ANSI_STYLE,
    COMPLETED,
    FlowerError,
    FlwrCli,
    executable,
    staged_app_dir,
    stop,
)
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.wire import RESULTS_FILE
from sites.site_settings import simulated_site_dirs

CONNECTION = "fedhealth-simulation"
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?(.*)$")
# Flower warns about its default federation size on every run; `simulate` always sets it.
_NOT_FOR_THE_USER = ("default simulated SuperNodes changed",)


class SimulationError(RuntimeError):
    """The simulation could not start, or ended without writing results."""


@dataclass(frozen=True)
class LocalSuperLink:
    """A simulation-mode SuperLink on 127.0.0.1 that this process started and will stop."""

    cli: FlwrCli
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def local_superlink(attempts: int = 5, ready_timeout: float = 60) -> Iterator[LocalSuperLink]:
    """A SuperLink for the runs inside the block; stopped, children included, when it ends.

    A free port can be taken between finding and binding it, so each attempt checks that the
    SuperLink process itself listens on its port, and tries another port if not.
    """
    with tempfile.TemporaryDirectory(prefix="fedhealth-superlink-") as home:
        link = _start_superlink(Path(home), attempts, ready_timeout)
        try:
            yield link
        finally:
            stop(link.process)


def _start_superlink(home: Path, attempts: int, ready_timeout: float) -> LocalSuperLink:
    log = home / "superlink.log"
    for _ in range(attempts):
        port = _unused_port()
        cli = FlwrCli(home, CONNECTION, f"127.0.0.1:{port}")
        env = {**cli.env(), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # Ray's announced default
        with log.open("ab") as out:
            process = subprocess.Popen(
                [executable("flower-superlink"), "--insecure", "--simulation", "--host",
                 "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if _serves(process, port, ready_timeout):
            return LocalSuperLink(cli, process, log)
        stop(process)
    raise SimulationError(f"no local SuperLink started in {attempts} attempts; its log:\n"
                          f"{log.read_text(errors='replace')[-2000:]}")


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serves(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """True once `process` itself listens on `port` and answers /health; False if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            listening = any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                            for c in psutil.Process(process.pid).net_connections("tcp"))
            if listening and httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                return True
        except (psutil.Error, httpx.HTTPError):
            pass
        time.sleep(0.3)
    return False


def simulate(config: RunConfig, *, num_sites: int | None = None, verbose: bool = False,
             superlink: LocalSuperLink | None = None) -> dict[str, object]:
    """Run one federation over the hospital folders in `config.data_dir`; return its results.

    verbose: forward every line of the run's log to the `flwr` logger at its level (and let the
        simulated sites log too); otherwise only its warnings and errors (excluded sites).
    superlink: a `local_superlink()` to run on (a grid of runs can share one); by default
        each call starts its own and stops it before returning.
    """
    if not config.out_dir:
        raise SimulationError("run config 'out-dir' is empty: results need a folder")
    results_path = Path(config.out_dir) / RESULTS_FILE
    results_path.unlink(missing_ok=True)
    sites = num_sites or len(simulated_site_dirs(Path(config.data_dir)))
    if not config.expected_sites:  # every virtual node joins: wait for all of them
        config = replace(config, expected_sites=sites)
    # The apps run in Flower's processes, whose working folder is not the caller's
    config = replace(config, data_dir=_absolute(config.data_dir), key_dir=_absolute(config.key_dir),
                     state_dir=_absolute(config.state_dir), out_dir=_absolute(config.out_dir))
    federation = (f"num-supernodes={sites} client-resources-num-cpus=1 "
                  f"client-resources-num-gpus=0.0 init-args-logging-level='ERROR' "
                  f"init-args-log-to-driver={str(verbose).lower()}")
    with nullcontext(superlink) if superlink else local_superlink() as link:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=link.cli.home,
                                         delete=False) as run_config:
            run_config.write(run_config_toml(config))
        try:
            run_id = link.cli.submit(staged_app_dir(), [run_config.name], [federation])
            _forward(link.cli.stream_log(run_id), verbose)
            status = link.cli.status(run_id)
        except FlowerError as err:
            raise SimulationError(f"{err}; SuperLink log: {link.log}") from err
        finally:
            os.unlink(run_config.name)
    if status != COMPLETED or not results_path.exists():
        raise SimulationError(f"run {run_id} ended as '{status}' and wrote no {results_path}; "
                              "see the log above")
    results: dict[str, object] = json.loads(results_path.read_text())
    return results


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path else path


def run_config_toml(config: RunConfig) -> str:
    """Every field as a TOML line: what `flwr run --run-config FILE.toml` reads, free of the
    quoting a path with spaces would need on a command line."""
    def value(v: bool | int | float | str) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)

    return "".join(f"{key} = {value(v)}\n" for key, v in config.to_flower().items())


def _forward(lines: Iterator[str], verbose: bool) -> None:
    """Re-log the run's lines through Flower's logger, as an in-process run logged them."""
    logger = logging.getLogger("flwr")
    levels = logging.getLevelNamesMapping()
    level = logging.INFO
    for line in lines:
        text = ANSI_STYLE.sub("", line).rstrip()
        if match := _LEVEL.match(text):
            level, text = levels[match[1]], match[2]
        if (verbose or level >= logging.WARNING) and not any(n in text for n in _NOT_FOR_THE_USER):
            logger.log(level, text)

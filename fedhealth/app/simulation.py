"""Run a federation in Flower's simulation engine from Python (tests, `compare`, the demo).

`flwr run .` does the same from the command line; this path exists because a researcher's grid
needs many runs with different configs in one process, and `run_simulation` takes app objects.
"""

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from flwr.simulation import run_simulation

from fedhealth.app.server_app import server_app
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.wire import RESULTS_FILE
from sites.client_app import app as client_app
from sites.site_settings import simulated_site_dirs


class SimulationError(RuntimeError):
    """The simulation ended without writing results."""


def _not_the_run_simulation_notice(record: logging.LogRecord) -> bool:
    # `run_simulation` is how a Python grid passes app objects; the notice is not the user's to act on
    return "`run_simulation` function is deprecated" not in record.getMessage()


@contextmanager
def _flower_warnings_only() -> Iterator[None]:
    """Flower logs every round at INFO; a grid of runs wants only its warnings (excluded sites)."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addFilter(_not_the_run_simulation_notice)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(_not_the_run_simulation_notice)


def simulate(config: RunConfig, *, num_sites: int | None = None,
             verbose: bool = False) -> dict[str, object]:
    """Run one federation over the hospital folders in `config.data_dir`; return its results.

    verbose: keep Flower's per-round log; otherwise only its warnings are shown.
    """
    if not config.out_dir:
        raise SimulationError("run config 'out-dir' is empty: results need a folder")
    results_path = Path(config.out_dir) / RESULTS_FILE
    results_path.unlink(missing_ok=True)
    sites = num_sites or len(simulated_site_dirs(Path(config.data_dir)))
    if not config.expected_sites:  # every virtual node joins: wait for all of them
        config = replace(config, expected_sites=sites)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's announced default
    with nullcontext() if verbose else _flower_warnings_only():
        run_simulation(
            server_app(config),
            client_app,
            num_supernodes=sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"logging_level": logging.ERROR, "log_to_driver": False},
            },
        )
    if not results_path.exists():
        raise SimulationError(f"the federation wrote no {results_path}; see the log above")
    return json.loads(results_path.read_text())

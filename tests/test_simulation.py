"""The simulation path: `flwr run` on a SuperLink of our own, and nothing left running after it.

Flower's SuperLink, its SuperExec, the ServerApp, the simulation process and Ray's processes all
share the session the SuperLink was started in, so "no process left behind" is checked as "no
live process in that session", plus the port being free again.
"""

import socket
import tomllib
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from sessions import alive_in_session
from typer.testing import CliRunner

from fedhealth.app import simulation
from fedhealth.app.cli import app
from fedhealth.app.simulation import local_superlink, run_config_toml, simulate
from fedhealth.core.config import RunConfig


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_run_config_reaches_flower_as_toml_whatever_the_paths_hold() -> None:
    config = RunConfig(data_dir='/data/my "site" folder', out_dir="/tmp/ü out", learning_rate=1e-05,
                       encrypted=False, join_timeout=300.0)
    assert RunConfig.from_flower(tomllib.loads(run_config_toml(config))) == config


def test_superlink_is_stopped_with_its_session_when_the_block_ends() -> None:
    with local_superlink() as link:
        session, port = link.process.pid, int(link.cli.address.rsplit(":", 1)[1])
        assert alive_in_session(session)
        assert not _port_is_free(port)
    assert link.process.returncode is not None
    assert alive_in_session(session) == set()
    assert _port_is_free(port)


def test_a_port_taken_by_another_process_is_given_up_for_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        free = simulation._unused_port
        monkeypatch.setattr(simulation, "_unused_port", lambda: next(ports, None) or free())
        with local_superlink() as link:
            assert link.cli.address != f"127.0.0.1:{taken}"
            assert psutil.Process(link.process.pid).is_running()


@pytest.mark.slow
def test_a_simulated_run_writes_results_and_leaves_no_process(
        synth_federation: Path, key_dir: Path, tmp_path: Path) -> None:
    config = replace(RunConfig(num_server_rounds=1, policy="fedavg", encrypted=False),
                     data_dir=str(synth_federation), key_dir=str(key_dir),
                     out_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"))
    with local_superlink() as link:
        results = simulate(config, superlink=link)
        # the run's own processes (ServerApp, simulation, Ray) are gone once it has ended
        assert alive_in_session(link.process.pid) == {link.process.pid}
    assert alive_in_session(link.process.pid) == set()
    assert set(results["evaluate_by_round"]) == {"0", "1"}
    assert len(results["per_site"]) == 3


def test_simulate_command_refuses_a_bad_run_config_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[object] = []
    monkeypatch.setattr(simulation, "_start_superlink", lambda *args: started.append(args))
    result = CliRunner().invoke(app, ["simulate", "--run-config", "policy='fedbm' data-dir='x'"])
    assert result.exit_code == 2
    assert "'policy' is 'fedbm': choose one of" in result.output
    assert started == []  # no SuperLink was even tried

"""A real federation on 127.0.0.1: `fedhealth federation start`, three `fedhealth site start`,
`fedhealth federation run`, all as separate processes with TLS and SuperNode authentication.

Every site approves one release of the app (the checkout's app as Flower bundles it, unpacked
into a folder of its own so edits to the checkout cannot change its hash) with `fedhealth site
approve`. One encrypted 2-round run of it covers the main path and the dropout (a site is
SIGKILLed as soon as it has written its round-1 evaluation, before the round-2 instruction can
exist, so it can never take part in round 2 however fast it is); the same release with one line
of its ClientApp changed is refused at every site before that line runs; refusals of an
unregistered key and of a client without the federation CA run against the same SuperLink.
Ports come from conftest's `free_port`. Every coordinator-side Python process runs with an audit
hook that records each `*.ctx` file it opens, so the test can show the ServerApp only ever read
aggregator.ctx.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flwr.common.constant import ErrorCode
from sessions import alive_in_session
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.deployment import pki
from fedhealth.app.deployment.bundles import CoordinatorBundle, init_federation
from fedhealth.app.flower_cli import default_app_dir, executable, flower_env, unpack_app
from fedhealth.core.synth.federation import synthesize_federation
from sites.app_approval import fab_bytes, fab_sha256
from sites.audit import REFUSAL_KIND, AuditLog

pytestmark = pytest.mark.slow

SITES = ["a", "b", "c"]
FEDHEALTH = [sys.executable, "-c", "from fedhealth.app.cli import app; app()"]
CTX_HOOK = '''import os, sys
def _hook(event, args):
    path = args[0] if event == "open" else None
    if isinstance(path, (str, os.PathLike)) and str(path).endswith(".ctx"):
        with open(os.environ["FEDHEALTH_CTX_LOG"], "a") as log:
            log.write(f"{' '.join(sys.orig_argv)}\\t{os.path.abspath(path)}\\n")
if os.environ.get("FEDHEALTH_CTX_LOG"):
    sys.addaudithook(_hook)
'''


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """Every process the test starts, each in its own session; all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            self.started[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                                  env=env, start_new_session=True)
        return log

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.started[name].pid, sig)

    def stop_all(self) -> None:
        """SIGTERM every session, SIGKILL what is left after 20 s; then nothing may remain."""
        for name in self.started:
            self.kill(name, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for name, process in self.started.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if alive_in_session(process.pid):  # the leader's children outlived it
                self.kill(name)
                process.wait(timeout=10)
        wait_for(lambda: not any(alive_in_session(p.pid) for p in self.started.values()), 10,
                 "every process the test started to be gone")


def approve(app_dir: Path, config: Path) -> str:
    """`fedhealth site approve APP --config site.toml`; the hash it printed."""
    result = CliRunner().invoke(app, ["site", "approve", str(app_dir), "--config", str(config)])
    assert result.exit_code == 0, result.output
    return result.stdout.split()[0]


def site_toml(bundle_dir: Path, data_dir: Path, runtime_port: int) -> Path:
    path = bundle_dir / "site.toml"
    text = path.read_text().replace('data-dir = ""', f'data-dir = "{data_dir}"')
    path.write_text(text.replace("runtime-port = 9094", f"runtime-port = {runtime_port}"))
    return path


class Federation:
    def __init__(self, root: Path, processes: Processes, free_port: Callable[[], int]) -> None:
        self.root = root
        self.processes = processes
        self.free_port = free_port
        self.coordinator = CoordinatorBundle.load(root / "fed" / "coordinator")
        self.ctx_log = root / "ctx-opens.log"
        self.release = unpack_app(fab_bytes(default_app_dir()), root / "release" / "fedhealth")

    def site_dir(self, site: str) -> Path:
        return self.root / "fed" / site

    def log(self, name: str) -> str:
        return (self.processes.logs / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               free_port: Callable[[], int]) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("e2e")
    synthesize_federation(root / "data", sites=len(SITES), seed=11, images_per_site=16)
    init_federation("e2e", SITES, f"127.0.0.1:{free_port()}", root / "fed")
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(CTX_HOOK)
    (root / "logs").mkdir()
    processes = Processes(root / "logs")
    fed = Federation(root, processes, free_port)
    try:
        coordinator_env = {**os.environ, "PYTHONPATH": str(root / "hook"),
                           "FEDHEALTH_CTX_LOG": str(fed.ctx_log)}
        processes.start("coordinator", [*FEDHEALTH, "federation", "start", "--dir",
                                        str(fed.coordinator.root), "--bind", "127.0.0.1"],
                        env=coordinator_env)
        wait_for(lambda: "SuperLink ready" in fed.log("coordinator"), 120, "the SuperLink")
        for k, site in enumerate(SITES):
            config = site_toml(fed.site_dir(site), root / "data" / f"hospital-{k + 1}",
                               free_port())
            assert approve(fed.release, config) == fab_sha256(fab_bytes(fed.release))
            processes.start(site, [*FEDHEALTH, "site", "start", "--config", str(config)])
        for site in SITES:
            wait_for(lambda site=site: "SuperNode ID" in fed.log(site), 120, f"site {site} to connect")
        yield fed
    finally:
        processes.stop_all()


def refused_site(fed: Federation, name: str, change: Callable[[Path], None]) -> str:
    """Start a copy of site a's bundle, changed by `change`; return its output once it exits."""
    bundle = fed.root / name
    shutil.copytree(fed.site_dir("a"), bundle, ignore=shutil.ignore_patterns("state", "*.jsonl"))
    change(bundle)
    config = bundle / "site.toml"
    text = config.read_text().replace(str(fed.site_dir("a")), str(bundle))
    config.write_text(re.sub(r"runtime-port = \d+", f"runtime-port = {fed.free_port()}", text))
    fed.processes.start(name, [*FEDHEALTH, "site", "start", "--config", str(config),
                               "--max-wait", "20"])
    fed.processes.started[name].wait(timeout=120)
    return fed.log(name)


def test_supernode_with_unregistered_key_is_refused(federation: Federation) -> None:
    def new_key(bundle: Path) -> None:
        private, public = pki.make_node_keypair()
        pki.write_secret(bundle / "node.key", private, overwrite=True)
        pki.write_public(bundle / "node.pub", public)

    output = refused_site(federation, "intruder", new_key)
    assert federation.processes.started["intruder"].returncode != 0
    assert "Failed to activate SuperNode" in output
    assert "SuperNode ID" not in output


def test_client_without_the_federation_ca_cannot_connect(federation: Federation) -> None:
    def other_ca(bundle: Path) -> None:
        pki.write_public(bundle / "ca.pem", pki.cert_pem(pki.make_ca("elsewhere")[1]))

    output = refused_site(federation, "wrong-ca", other_ca)
    assert federation.processes.started["wrong-ca"].returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in output and "SuperNode ID" not in output

    # And Flower's own SuperNode with no root certificate at all (system trust store only).
    config = federation.site_dir("a")
    federation.processes.start("no-ca", [
        executable("flower-supernode"), "--superlink", federation.coordinator.superlink,
        "--auth-supernode-private-key", str(config / "node.key"),
        "--port", str(federation.free_port()), "--max-retries", "2", "--max-wait-time", "20"],
        env=flower_env(federation.root / "no-ca"))
    federation.processes.started["no-ca"].wait(timeout=120)
    assert "CERTIFICATE_VERIFY_FAILED" in federation.log("no-ca")


def test_app_with_one_changed_line_is_refused_at_every_site_before_it_runs(
        federation: Federation) -> None:
    """The approved release with one line of its ClientApp module changed (to write a marker
    file when it is imported) is refused by every site: the marker never appears, each site's
    audit log names the refused hash, and the aggregator records each site's error reply."""
    marker = federation.root / "changed-clientapp-ran"
    changed = federation.root / "changed" / "fedhealth"
    shutil.copytree(federation.release, changed)
    client_app = changed / "sites" / "client_app.py"
    source = client_app.read_text()
    assert source.count("\napp = ClientApp()\n") == 1
    client_app.write_text(source.replace(
        "\napp = ClientApp()\n",
        f"\napp = ClientApp(); __import__('pathlib').Path({str(marker)!r}).write_text('ran')\n"))
    changed_hash = fab_sha256(fab_bytes(changed))
    out_dir = federation.root / "changed-results"
    federation.processes.start("changed-run", [
        *FEDHEALTH, "federation", "run", "--dir", str(federation.coordinator.root),
        "--app", str(changed), "--run-config",
        f'num-server-rounds=1 min-sites=2 out-dir="{out_dir}"'])
    federation.processes.started["changed-run"].wait(timeout=600)
    output = federation.log("changed-run")

    assert not marker.exists()
    for site in SITES:
        refusals = [e for e in AuditLog(federation.site_dir(site) / "audit.jsonl").entries()
                    if e["kind"] == REFUSAL_KIND]
        assert refusals, f"site {site} logged no refusal"
        assert {e["app"] for e in refusals} == {changed_hash}
        assert all(e["error"]["code"] == ErrorCode.INVALID_FAB and changed_hash in
                   e["error"]["reason"] for e in refusals)
    # Every reply was an error, so the strategy counted every site as failed at every step;
    # with fewer than min-sites valid replies it keeps the previous global and the run goes on
    # to its end, having trained nothing.
    assert federation.processes.started["changed-run"].returncode == 0, output
    assert "no site's evaluation was valid" in output
    results = json.loads((out_dir / "results.json").read_text())
    assert results["train_by_round"] == {"1": {}} and results["per_site"] == {}
    rejected = results["rejected"]
    assert {(r["kind"], r["server_round"]) for r in rejected} == {
        ("evaluate", 0), ("census", 1), ("evaluate", 1)}
    assert sorted(re.fullmatch(rf"the site reported an error: site (\w+) refused app sha256 "
                               rf"{changed_hash}: .*", r["reason"])[1] for r in rejected) == \
        sorted(SITES * 3)


def test_encrypted_run_survives_a_site_killed_after_round_1(federation: Federation) -> None:
    audit = {site: AuditLog(federation.site_dir(site) / "audit.jsonl") for site in SITES}

    def sent(site: str, kind: str, server_round: int) -> bool:
        return any(e["kind"] == kind and e["round"] == server_round
                   for e in audit[site].entries())

    federation.processes.start("run", [*FEDHEALTH, "federation", "run", "--dir",
                                       str(federation.coordinator.root), "--app",
                                       str(federation.release), "--run-config",
                                       "num-server-rounds=2 min-sites=2"])
    # SIGKILL (no goodbye to the SuperLink, like a crash or a power cut) the moment site c has
    # logged its round-1 evaluation: round 2's instruction needs that reply (or c's absence)
    # first, and then c would still have to train and encrypt before it could send anything.
    # (600 s: on this shared 2-core machine at load average 27 each instruction's ClientApp
    # process took over a minute to start and reply, and 300 s were not enough)
    wait_for(lambda: sent("c", "evaluate", 1), 600, "site c's round-1 evaluation",
             interval=0.05)
    federation.processes.kill("c")
    federation.processes.started["run"].wait(timeout=600)
    output = federation.log("run")
    assert federation.processes.started["run"].returncode == 0, output

    results_dir = federation.coordinator.results_dir
    results = json.loads((results_dir / "results.json").read_text())
    assert any((results_dir / "checkpoint").iterdir())
    # the coordinator sees how the sites did without opening results.json: the per-site table,
    # printed after the run completed, holds each surviving site's and the mean's value
    table = re.sub(r"\x1b\[[0-9;]*m", "", output.rsplit(str(results_dir), 1)[-1])
    for value in (*(results["per_site"][site]["balanced_accuracy"] for site in ("a", "b")),
                  results["mean"]["balanced_accuracy"]):
        assert f"{value:.3f}" in table, table
    assert set(results["train_by_round"]["1"]) == set(SITES)
    assert set(results["train_by_round"]["2"]) == set(results["evaluate_by_round"]["2"]) == {"a", "b"}
    # c's absence is recorded (an error reply from the SuperLink), in round 1's evaluation or
    # round 2's training, whichever c's last reply did not reach
    assert any(r["server_round"] in (1, 2) for r in results["rejected"]), results["rejected"]
    for site in ("a", "b"):
        assert sent(site, "train", 2) and sent(site, "evaluate", 2)
    assert not sent("c", "train", 2)

    # The coordinator side opened exactly one key file, aggregator.ctx, and the ServerApp did.
    opens = [line.split("\t") for line in federation.ctx_log.read_text().splitlines()]
    aggregator = str(federation.coordinator.key_dir / "aggregator.ctx")
    assert {path for _, path in opens} == {aggregator}
    assert any("flwr-serverapp" in argv for argv, _ in opens)

"""`fedhealth site approve`, the approved list in site.toml (sites.app_approval) and the gate
that enforces it (sites.app_gate).

The hash approved from a folder must be the one Flower computes for what `flwr build` (and so
`flwr run`) makes of that folder; the list must survive being edited around hospital IT's
comments; a malformed list stops `site start` by name, and the gate treats an unreadable one as
approving nothing. The gate runs against a real SuperNode Runtime API (Flower's own FastAPI app
and NodeState, served on 127.0.0.1) holding one task of a tiny app whose ClientApp module writes
a marker file when imported: approved, Flower's `flwr-clientapp` runs it and replies; not
approved, the reply is Flower's INVALID_FAB error naming the hash, the task ends failed, the
audit log has the refusal, and the marker never appears. The whole federation is in
tests/test_deployment_e2e.py.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeState, NodeStateFactory
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.deployment.bundles import site_toml
from fedhealth.app.deployment.site_config import SiteConfigError, load_site_config
from fedhealth.app.flower_cli import executable
from sites.app_approval import AppApprovalError, approve, approved_apps, fab_bytes, fab_sha256
from sites.app_gate import AppGate
from sites.audit import REFUSAL_KIND, AuditLog

PYPROJECT = '''[project]
name = "tinyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
'''
CLIENT = '''from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path("{marker}").write_text("ran")
app = ClientApp()


@app.train()
def train(message, context):
    return Message(RecordDict({{"answer": ConfigRecord({{"ran": 1}})}}), reply_to=message)
'''
NODE_ID, RUN_ID = 5, 7


@pytest.fixture()
def tiny_app(tmp_path: Path) -> Path:
    folder = tmp_path / "tinyapp"
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text(CLIENT.format(marker=tmp_path / "ran"))
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return folder


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml("f", "a", "127.0.0.1:9093").replace('data-dir = ""',
                                                                    'data-dir = "data"'))
    return path


def test_folder_is_hashed_as_flwr_build_bundles_it(tiny_app: Path, tmp_path: Path) -> None:
    out = tmp_path / "built"
    out.mkdir()
    subprocess.run([executable("flwr"), "build", "--app", str(tiny_app)], cwd=out, check=True,
                   capture_output=True)
    (fab,) = out.glob("*.fab")
    built_hash = hashlib.sha256(fab.read_bytes()).hexdigest()
    assert fab_sha256(fab_bytes(tiny_app)) == fab_sha256(fab_bytes(fab)) == built_hash
    assert built_hash[:8] in fab.name  # Flower names the file after the same hash

    client = tiny_app / "tinyapp" / "client.py"
    client.write_text(client.read_text().replace("app = ClientApp()", "app = ClientApp()  # !"))
    assert fab_sha256(fab_bytes(tiny_app)) != built_hash


def test_approve_adds_the_hash_once_and_keeps_the_comments(tiny_app: Path, config: Path) -> None:
    before = config.read_text()
    runner = CliRunner()
    first = runner.invoke(app, ["site", "approve", str(tiny_app), "--config", str(config)])
    assert first.exit_code == 0, first.output
    fab_hash = first.stdout.split()[0]
    assert fab_hash == fab_sha256(fab_bytes(tiny_app))
    again = runner.invoke(app, ["site", "approve", str(tiny_app), "--config", str(config)])
    assert again.exit_code == 0 and "already approved" in again.output
    assert config.read_text().startswith(before)  # every field and comment as it was
    assert load_site_config(config).approved_apps == approved_apps(config) == {fab_hash}

    other = "ab" * 32
    assert approve(config, other) and not approve(config, other)
    assert load_site_config(config).approved_apps == {fab_hash, other}


def test_approving_a_missing_app_names_it(config: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["site", "approve", str(tmp_path / "nope.fab"),
                                      "--config", str(config)])
    # the console wraps at the terminal width, which may fall inside the path
    assert result.exit_code == 2 and "nope.fab" in "".join(result.output.split())
    assert approved_apps(config) == frozenset()


@pytest.mark.parametrize("approved, message", [
    ('approved = ["not-a-hash"]', r"\[apps\] approved holds 'not-a-hash', not a sha256"),
    (f'approved = ["{"AB" * 32}"]', "not a sha256 hash"),  # Flower's hashes are lowercase
    (f'approved = "{"ab" * 32}"', r"\[apps\] approved must be a list"),
])
def test_malformed_list_stops_the_site_by_name(config: Path, approved: str, message: str) -> None:
    config.write_text(config.read_text() + f"\n[apps]\n{approved}\n")
    with pytest.raises(SiteConfigError, match=message) as raised:
        load_site_config(config)
    assert str(config) in str(raised.value)
    with pytest.raises(AppApprovalError, match=message):
        approve(config, "cd" * 32)  # a malformed list is not extended either


def test_gate_approves_nothing_while_site_toml_is_unreadable(config: Path, tmp_path: Path) -> None:
    approve(config, "ab" * 32)
    gate = AppGate("127.0.0.1:1", config, "a", tmp_path / "audit.jsonl")
    assert gate.approved() == {"ab" * 32}
    config.write_text("[apps\n")
    assert gate.approved() == frozenset()
    config.unlink()
    assert gate.approved() == frozenset()


@dataclasses.dataclass
class SuperNode:
    """Flower's SuperNode Runtime API on 127.0.0.1 over its own NodeState."""

    state: NodeState
    address: str
    task_id: int = 0

    def add_task(self, fab: bytes) -> None:
        """What the SuperNode does when an instruction of a new run arrives: store the FAB, the
        run and its context, create the ClientApp task, store the message and its objects."""
        fab_hash = fab_sha256(fab)
        run = dataclasses.replace(Run.create_empty(RUN_ID), fab_id="tests/tinyapp",
                                  fab_version="1.0.0", fab_hash=fab_hash)
        self.state.store_fab(Fab(fab_hash, fab, {}))
        self.state.store_run(run)
        self.state.set_run_series_context(run.series_id, Context(
            run_id=RUN_ID, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config={}))
        self.task_id = self.state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID,
                                              fab_hash=fab_hash) or 0
        message = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          metadata=Metadata(run_id=RUN_ID, message_id="", src_node_id=1,
                                            dst_node_id=NODE_ID, reply_to_message_id="",
                                            group_id="", created_at=time.time(), ttl=600,
                                            message_type="train"))
        store = self.state.object_store
        with no_object_id_recompute():
            message.metadata.__dict__["_message_id"] = message.object_id
            self.state.store_message(message)
            store.preregister(RUN_ID, get_object_tree(message))
            for object_id, obj in get_all_nested_objects(message).items():
                store.put(object_id, obj.deflate())

    def reply(self, timeout: float = 90) -> Message:
        deadline = time.monotonic() + timeout
        while not (replies := self.state.get_messages_legacy(is_reply=True)):
            assert time.monotonic() < deadline, "no reply to the task's instruction"
            time.sleep(0.2)
        return replies[0]

    def task_status(self) -> tuple[str, str]:
        (task,) = self.state.get_tasks(task_ids=[self.task_id])
        return task.status.status, task.status.sub_status


@pytest.fixture()
def supernode(free_port: Callable[[], int], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[SuperNode]:
    # Flower's executor starts flwr-clientapp by name; it installs the app under FLWR_HOME
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent),
                                                os.environ.get("PATH", "")]))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state = factory.state()
    state.set_node_id(NODE_ID)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state_factory=factory), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the Runtime API did not start"
        time.sleep(0.05)
    try:
        yield SuperNode(state, f"127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_gate_refuses_an_unapproved_app_before_any_of_its_code_runs(
        supernode: SuperNode, tiny_app: Path, config: Path, tmp_path: Path) -> None:
    fab = fab_bytes(tiny_app)
    approve(config, "ab" * 32)  # another app
    supernode.add_task(fab)
    gate = AppGate(supernode.address, config, "a", tmp_path / "audit.jsonl")
    assert gate.poll_once()

    reply = supernode.reply()
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert f"site a refused app sha256 {fab_sha256(fab)}" in reply.error.reason
    assert supernode.task_status() == ("finished", "failed")
    (entry,) = AuditLog(tmp_path / "audit.jsonl").entries()
    assert (entry["kind"], entry["app"], entry["run"], entry["instruction"]) == (
        REFUSAL_KIND, fab_sha256(fab), RUN_ID, "train")
    assert entry["error"]["reason"] == reply.error.reason
    assert not gate.poll_once()  # the task is done and nothing else is pending
    time.sleep(2)  # time enough for a stray process to have imported the app
    assert not (tmp_path / "ran").exists() and not (tmp_path / "flwr-home").exists()


@pytest.mark.parametrize("approved", [True, False], ids=["approved", "allow-any-app"])
def test_gate_hands_an_approved_app_to_flowers_clientapp(
        supernode: SuperNode, tiny_app: Path, config: Path, tmp_path: Path,
        approved: bool) -> None:
    """Approved (or any app, with --allow-any-app): Flower's flwr-clientapp runs it unchanged,
    which is also what shows the marker would appear if the app's code ran."""
    fab = fab_bytes(tiny_app)
    if approved:
        approve(config, fab_sha256(fab))
    supernode.add_task(fab)
    gate = AppGate(supernode.address, config, "a", tmp_path / "audit.jsonl",
                   allow_any_app=not approved)
    assert gate.poll_once()

    reply = supernode.reply()
    assert not reply.has_error(), reply.error
    deadline = time.monotonic() + 60
    while supernode.task_status()[0] != "finished" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert supernode.task_status() == ("finished", "completed")
    assert (tmp_path / "ran").read_text() == "ran"
    assert AuditLog(tmp_path / "audit.jsonl").entries() == []

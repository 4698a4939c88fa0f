"""The site's SuperExec: starts Flower's own ClientApp process only for an app the site approved.

`fedhealth site start` runs the SuperNode with `--isolation process`, so the SuperNode launches
no ClientApp itself; this process is the only one that takes ClientApp tasks from the SuperNode's
Runtime API (127.0.0.1). Every task names the sha256 of its run's FAB: the SuperNode stores a
FAB under the sha256 of its content and refuses one whose declared hash differs
(Flower's `store_fab`), and serves a task's process exactly that FAB. So the check happens here,
before any process that could install or import the app exists:

- approved (`[apps] approved` in site.toml, read again for every task): Flower's `flwr-clientapp`
  is started for the task by Flower's own executor, unchanged;
- not approved: this process takes the task itself with Flower's runtime calls, sends the
  aggregator Flower's INVALID_FAB error reply (the strategy counts the site as failed), writes the
  refusal with the hash to the audit log and finishes the task as failed. The FAB's bytes are
  read only to hash them; nothing of it is unpacked, installed or imported.

`--allow-any-app` (development) starts every app and logs a warning for each unapproved run.
"""

import argparse
import contextlib
import os
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, SubprocessExecutor
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from sites.app_approval import FIELD, AppApprovalError, approved_apps, fab_sha256
from sites.audit import AuditLog

COMPONENT = "fedhealth-app-gate"
POLL_SECONDS = 0.5


def refusal_reason(site: str, fab_hash: str) -> str:
    """The error reply's text: which site refused which app, and how the site would allow it."""
    return (f"site {site} refused app sha256 {fab_hash}: it is not in the site's approved apps; "
            "the site approves a reviewed app with `fedhealth site approve`")


class AppGate:
    """Takes each ClientApp task from the SuperNode and starts it only if its app is approved."""

    def __init__(self, runtime_api_address: str, site_toml: Path, site: str, audit_log: Path,
                 allow_any_app: bool = False) -> None:
        self.address = runtime_api_address
        self.site_toml = site_toml
        self.site = site
        self.audit = AuditLog(audit_log)
        self.allow_any_app = allow_any_app
        self.executor = SubprocessExecutor()
        self.warned_runs: set[int] = set()
        self.client = self._client()

    def _client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list[ProtobufClientInterceptor] = [
            RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def approved(self) -> frozenset[str]:
        """The approved list now; an unreadable one approves nothing (the gate fails closed)."""
        try:
            return approved_apps(self.site_toml)
        except AppApprovalError as err:
            log(ERROR, "%s; refusing every app until it is fixed", err)
            return frozenset()

    def poll_once(self) -> bool:
        """Take one pending ClientApp task, if there is one, and start or refuse it."""
        response = self.client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP]))
        if not (response.HasField("task") and response.token):
            return False
        self.dispatch(response.task, response.token)
        return True

    def dispatch(self, task: Task, token: str) -> None:
        """Start the task's ClientApp if its FAB's hash is approved (or any, --allow-any-app),
        else refuse it."""
        fab_hash = task.fab_hash
        if fab_hash in self.approved():
            self._start(task, token)
        elif self.allow_any_app:
            if task.run_id not in self.warned_runs:
                self.warned_runs.add(task.run_id)
                log(WARNING, "--allow-any-app: run %s executes app sha256 %s, which this site "
                    "has NOT approved (%s in %s)", task.run_id, fab_hash, FIELD, self.site_toml)
            self._start(task, token)
        else:
            self.refuse(token)

    def _start(self, task: Task, token: str) -> None:
        """Flower's own `flwr-clientapp` for the task (Flower's executor, as its SuperExec does)."""
        self.executor.launch(ExecutionSpec(
            task_type=TaskType.CLIENT_APP, runtime_api_address=self.address, token=token,
            insecure=True, root_certificates_path=None, runtime_dependency_install=False,
            parent_pid=os.getpid(), suppress_output=False, task_id=task.task_id,
            fab_hash=task.fab_hash))

    def refuse(self, token: str) -> str:
        """Answer the task's instruction with an error and finish it failed; the refused hash.

        The hash is computed from the FAB bytes the task would have run, not taken from a label.
        """
        client = self._client(token)
        try:
            message, context, _, fab = pull_task_input(client)
            fab_hash = fab_sha256(fab.content)
            reason = refusal_reason(self.site, fab_hash)
            error = Error(code=ErrorCode.INVALID_FAB, reason=reason)
            self.audit.record_refusal(context.run_id, message.metadata.message_type, fab_hash,
                                      error)
            log(ERROR, "refused run %s: app sha256 %s is not approved (%s in %s)",
                context.run_id, fab_hash, FIELD, self.site_toml)
            push_message(client, Message(error, reply_to=message), context)
            push_task_output(client, context, SubStatus.FAILED, reason)
        finally:
            client.close()
        return fab_hash

    def serve(self) -> None:
        """Poll the SuperNode for tasks until this process is stopped."""
        log(INFO, "app gate for site %s: only apps in %s of %s run%s", self.site, FIELD,
            self.site_toml, " (and, --allow-any-app, every other)" if self.allow_any_app else "")
        while True:
            try:
                if self.poll_once():
                    continue
            except Exception as err:  # a task that cannot be handled must not stop the site
                log(ERROR, "app gate: %s", err)
            time.sleep(POLL_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--site-config", type=Path, required=True, help="site.toml")
    parser.add_argument("--site-name", required=True)
    parser.add_argument("--audit-log", type=Path, required=True)
    parser.add_argument("--allow-any-app", action="store_true")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args()
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    gate = AppGate(args.runtime_api_address, args.site_config, args.site_name, args.audit_log,
                   args.allow_any_app)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches `site start`'s whole group
        gate.serve()


if __name__ == "__main__":
    main()

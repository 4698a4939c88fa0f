"""The site's audit log: one JSON line per message the site sends, never its content.

Size and hash come from Flower's own content addressing: a RecordDict's `object_id` is the
sha256 Merkle root of its deflated object tree, the same id the SuperLink stores it under, so
an auditor can match a line to what the coordinator received without seeing a single value.
An error reply has no content: its line holds the error's code and its whole text, which is
only a category and a reference (sites.failure). An exported model (sites.bundle_export)
gets a line too: it leaves the federation's protection.
"""

import json
import os
import time
from pathlib import Path

from flwr.app import Error, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

REFUSAL_KIND = "app-refused"  # an instruction of an app the site did not approve, refused


def message_footprint(content: RecordDict) -> tuple[int, str, dict[str, dict[str, object]]]:
    """(bytes on the wire, sha256 object id, per-record type and bytes) of `content`."""
    objects = get_all_nested_objects(content)
    total = sum(len(obj.deflate()) for obj in objects.values())
    records: dict[str, dict[str, object]] = {}
    for name, record in content.items():
        tree = get_all_nested_objects(record)
        records[name] = {"type": type(record).__name__,
                         "bytes": sum(len(obj.deflate()) for obj in tree.values())}
    return total, content.object_id, records


class AuditLog:
    """Append-only JSON lines file; one line per message sent (time, run, round, kind, size)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def record(self, run_id: int, server_round: int, kind: str, content: RecordDict) -> dict:
        """Log one outgoing message and return the entry written."""
        size, digest, records = message_footprint(content)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": int(run_id),
                 "round": int(server_round), "kind": kind, "bytes": size, "sha256": digest,
                 "records": records}
        return self._append(entry)

    def record_error(self, run_id: int, server_round: int | None, kind: str, error: Error) -> dict:
        """Log one outgoing error reply (`round` is null when the instruction was unreadable)."""
        return self._append(_error_entry(run_id, server_round, kind, error))

    def record_refusal(self, run_id: int, kind: str, fab_hash: str, error: Error) -> dict:
        """Log the error reply to an instruction (`kind`: train, evaluate, query) of an app the
        site did not approve (sites.app_gate): kind `app-refused`, the app's sha256 (`app`)
        and the reply's code and text. `round` is null: the gate does not read the instruction."""
        entry = _error_entry(run_id, None, REFUSAL_KIND, error)
        return self._append(entry | {"app": fab_hash, "instruction": kind})

    def record_pull(self, pull: dict[str, object]) -> dict:
        """Log one PACS pull (sites/pull.py says what it holds: counts, never patient data)."""
        return self._append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "pacs-pull",
                             **pull})

    def record_export(self, training_id: str, server_round: int, bundle: Path,
                      files: dict[str, str]) -> dict:
        """Log a model leaving the federation's protection (`fedhealth site export`): the
        training and round, where the bundle went and the sha256 of each of its files."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "export",
                 "training": training_id, "round": int(server_round),
                 "bundle": str(Path(bundle).resolve()), "files": dict(files)}
        return self._append(entry)

    def record_privacy(self, run_id: int, server_round: int, privacy: dict[str, object]) -> dict:
        """Log what a round's update cost in differential privacy, before it leaves: the site's
        epsilon so far at its delta and the noise it added (sites.privacy_budget)."""
        return self._append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": int(run_id),
                             "round": int(server_round), "kind": "privacy", **privacy})

    def _append(self, entry: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, line)  # one write per line: concurrent processes never interleave
        finally:
            os.close(fd)
        return entry

    def entries(self) -> list[dict]:
        """Every entry so far, oldest first (an empty list if nothing was sent yet)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _error_entry(run_id: int, server_round: int | None, kind: str, error: Error) -> dict:
    reason = error.reason or ""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": int(run_id),
            "round": server_round, "kind": kind, "bytes": len(reason.encode()),
            "error": {"code": int(error.code), "reason": reason}}

"""The site audit log: what left, how big, its hash (Flower's object id); never a value."""

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from sites.audit import AuditLog


def _reply(seed: int) -> RecordDict:
    rng = np.random.default_rng(seed)
    return RecordDict({"arrays": ArrayRecord([rng.integers(0, 255, 4096).astype(np.uint8)]),
                       "metrics": MetricRecord({"num-examples": 987654321,
                                                "secret-looking-metric": 0.123456789}),
                       "config": ConfigRecord({"layout": "patient-name-Alice"})})


def test_entry_has_size_and_flower_object_id(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "logs" / "audit.jsonl")
    content = _reply(0)
    entry = log.record(run_id=7, server_round=2, kind="train", content=content)
    objects = get_all_nested_objects(content)
    assert entry["sha256"] == content.object_id and len(entry["sha256"]) == 64
    assert entry["bytes"] == sum(len(o.deflate()) for o in objects.values()) > 4096
    assert entry["records"]["arrays"]["type"] == "ArrayRecord"
    assert sum(r["bytes"] for r in entry["records"].values()) < entry["bytes"]
    assert (entry["run"], entry["round"], entry["kind"]) == (7, 2, "train")
    assert log.entries() == [entry]


def test_same_content_same_hash_other_content_other_hash(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    first = log.record(1, 1, "train", _reply(0))
    again = log.record(1, 1, "train", _reply(0))
    other = log.record(1, 2, "train", _reply(1))
    assert first["sha256"] == again["sha256"] != other["sha256"]
    assert len(log.entries()) == 3


def test_log_never_contains_content(tmp_path: Path) -> None:
    """Only sizes, names and the hash: the entry's shape is fixed, and no value of the content
    (count, metric, config string) appears anywhere in the file."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record(1, 1, "evaluate", _reply(0))
    text = path.read_text()
    entry = json.loads(text)
    assert set(entry) == {"time", "run", "round", "kind", "bytes", "sha256", "records"}
    assert set(entry["records"]) == {"arrays", "metrics", "config"}
    assert all(set(r) == {"type", "bytes"} for r in entry["records"].values())
    for value in ("987654321", "0.123456789", "123456789", "Alice"):
        assert value not in text

"""What the aggregator receives and what it can import: no secret key, no plaintext update."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from flwr.app import ArrayRecord
from strategy_harness import FakeGrid, FakeSite, random_tensors

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.keyfile import KeyFile
from fedhealth.core.crypto.keys import (
    SiteKey,
    init_key_files,
    load_aggregator_context,
    load_site_context,
)
from strategies.encrypted_fedavg import EncryptedFedAvg

STRATEGIES = Path(__file__).resolve().parents[1] / "strategies"
SITE_SIDE = {"fedhealth.core.crypto.keys", "fedhealth.core.crypto.codec", "fedhealth.core.crypto.messages",
             "sites"}


def test_every_record_the_aggregator_receives_is_ciphertext_or_metadata(tmp_path: Path) -> None:
    init_key_files(tmp_path)
    site_key: SiteKey = load_site_context(tmp_path / wire.SITE_KEY_FILE)
    aggregator = load_aggregator_context(tmp_path / wire.AGGREGATOR_KEY_FILE)
    secret_bytes = KeyFile.from_bytes(site_key.raw, "site").context_bytes
    sites = [FakeSite(f"h{k}", site_key, 10 + k, random_tensors(k)) for k in range(3)]
    grid = FakeGrid(sites)
    strategy = EncryptedFedAvg(aggregator, min_train_nodes=3, min_available_nodes=3,
                               min_evaluate_nodes=3)
    strategy.start(grid, ArrayRecord(), num_rounds=2)

    # every tensor a site encrypted, as the bytes float32/float64 arrays would carry
    plaintexts = [np.asarray(t * w, dtype=dtype).tobytes()[:64]
                  for s in sites for sent in s.encrypted for t in sent.values()
                  for w in (1.0, *strategy.census.weights(list(grid.sites)).values())
                  for dtype in (np.float32, np.float64)]
    assert grid.received
    for message in grid.received:
        content = message.content
        for record in content.array_records.values():
            for name, array in record.items():
                assert array.dtype == "uint8", f"{name} is {array.dtype}, not a ciphertext"
                blob = array.data
                vector = ts.ckks_vector_from(aggregator.context, blob)  # parses as CKKS
                with pytest.raises(ValueError, match="secret"):
                    vector.decrypt()  # and the aggregator's context cannot open it
                assert secret_bytes[-4096:] not in blob
                assert not any(p in blob for p in plaintexts)
                assert not _is_secret_context(blob)
        for record in content.config_records.values():
            assert all(isinstance(v, str | int | float | bool | bytes) for v in record.values())
        for record in content.metric_records.values():
            assert set(record) <= {wire.NUM_EXAMPLES, "loss", "distance"}
    kinds = {m.metadata.message_type for m in grid.received}
    assert kinds == {"query", "train", "evaluate"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_strategies_source_never_names_site_side_crypto() -> None:
    for path in STRATEGIES.rglob("*.py"):
        for name in imported_modules(path):
            assert not any(name == s or name.startswith(s + ".") for s in SITE_SIDE), \
                f"{path.name} imports {name}, which can hold a secret key"


def test_importing_strategies_loads_no_site_side_module() -> None:
    """The transitive import graph, in a clean interpreter."""
    code = ("import sys, strategies.encrypted_fedavg, strategies.checkpoint, "
            "strategies.reply_check; print('\\n'.join(sys.modules))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    leaked = {m for m in loaded if any(m == s or m.startswith(s + ".") for s in SITE_SIDE)}
    assert not leaked, f"strategies/ pulls in site-side modules: {sorted(leaked)}"
    assert "fedhealth.core.crypto.aggregator_key" in loaded  # the check itself can see imports


def _is_secret_context(blob: bytes) -> bool:
    try:
        return ts.context_from(blob).has_secret_key()
    except Exception:  # not a context at all
        return False

"""What a site keeps of each evaluated round so that it can later export that round's model.

After scoring a round's global, a site files, per training id and round: the instruction as it
arrived (E(global) still encrypted, with its check-value facts: round, weight sum, layout hash,
key fingerprint), the tensors of its scored model that the global does not hold (personal
layers, FedBN's own normalisation statistics, Ditto's whole personal model), the operating
threshold it chose and the metrics it measured. Exporting (sites.bundle_export) decrypts the
global again with the site key, so an export needs that key and re-runs the integrity checks:
nothing exportable is kept in plaintext beyond what the personal store already keeps.

Files: `<state-dir>/received-global/<site>/run-<training id>.round-<N>.npz` (one per round, the
newest `KEPT_ROUNDS` kept; written through `PersonalStore`, so atomically) and beside them
`run-<training id>.history.json`, every round's metrics, which the model card reports.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from fedhealth.core.atomic_file import write_atomically
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import Instruction
from sites.data_limits import DataLimits
from sites.personal_store import (
    RECEIVED_GLOBAL,
    PersonalStore,
    PersonalStoreError,
    path_part,
    store_folder,
)

KEPT_ROUNDS = 3
"""Rounds a site keeps exportable per training: a DenseNet121 global costs ~112 MB a round."""

_FACTS = "facts.json"
_SITE_PREFIX = "site/"
_ROUND = re.compile(r"^run-(?P<training>.+)\.round-(?P<round>\d+)\.npz$")


class ArchiveError(ValueError):
    """Nothing exportable is kept for the site, training or round asked for."""


@dataclass(frozen=True)
class RoundFacts:
    """Everything about one scored round but its tensors; `instruction` is the received
    `fh.crypto` record's fields (`Instruction` minus the global and config records)."""

    site: str
    training_id: str
    server_round: int
    instruction: dict[str, object]
    run_config: dict[str, object]  # `RunConfig.to_flower()` of the run
    layout: list[tuple[str, list[int], str]]  # the shared layout E(global) decrypts into
    limits: dict[str, object]  # the site's `DataLimits`: classes, largest image decoded
    threshold: float | None
    metrics: dict[str, float]
    train_examples: int

    @classmethod
    def scored(cls, site: str, instruction: Instruction, run_config: Mapping[str, object],
               layout: TensorLayout, limits: DataLimits, threshold: float | None,
               metrics: Mapping[str, float], train_examples: int) -> "RoundFacts":
        """The facts of a round a site has just scored under `instruction`."""
        received = {f.name: getattr(instruction, f.name) for f in fields(Instruction)
                    if f.name not in ("global_record", "config")}
        entries = [(name, list(shape), dtype) for name, shape, dtype in layout.entries]
        return cls(site, instruction.training_id, instruction.server_round, received,
                   dict(run_config), entries, asdict(limits), threshold,
                   {k: float(v) for k, v in metrics.items()}, int(train_examples))


@dataclass(frozen=True)
class ArchivedRound:
    """One round as the site filed it."""

    facts: RoundFacts
    ciphertexts: list[bytes]
    site_tensors: dict[str, np.ndarray]

    def instruction(self) -> Instruction:
        """The instruction rebuilt as it arrived, E(global) included."""
        from flwr.app import ConfigRecord

        fields = self.facts.instruction
        return Instruction(global_record=wire.ciphertexts_to_record(self.ciphertexts),
                           config=ConfigRecord(), **fields)  # type: ignore[arg-type]

    def shared_layout(self) -> TensorLayout:
        return TensorLayout(tuple((n, tuple(s), t) for n, s, t in self.facts.layout))


def site_tensors(scored: Mapping[str, np.ndarray],
                 global_shared: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The scored model's tensors that are not the global's own values, bit for bit: so
    {**global, **these} is the scored model exactly, whatever the policy kept or changed."""
    return {name: np.asarray(t) for name, t in scored.items()
            if global_shared is None or name not in global_shared
            or not np.array_equal(np.asarray(t), global_shared[name])
            or np.asarray(t).dtype != np.asarray(global_shared[name]).dtype}


class RoundArchive:
    """The exportable rounds one site keeps in its state folder."""

    def __init__(self, state_dir: Path, site: str) -> None:
        self.state_dir = Path(state_dir)
        self.site = site

    def _store(self, training_id: str, server_round: int) -> PersonalStore:
        return PersonalStore(None, self.state_dir, run_key=f"{training_id}.round-{server_round}",
                             site=self.site, kind=RECEIVED_GLOBAL)

    @property
    def folder(self) -> Path:
        return store_folder(self.state_dir, RECEIVED_GLOBAL, self.site)

    def _history_path(self, training_id: str) -> Path:
        return self.folder / f"run-{path_part(training_id)}.history.json"

    def keep(self, instruction: Instruction, facts: RoundFacts,
             tensors: Mapping[str, np.ndarray]) -> None:
        """File one scored round; older rounds beyond `KEPT_ROUNDS` are deleted."""
        if instruction.global_record is None:
            return  # round 0: the seed's model, nothing received to export
        payload: dict[str, np.ndarray] = {
            _FACTS: np.frombuffer(json.dumps(asdict(facts)).encode(), dtype=np.uint8)}
        for i, blob in enumerate(wire.record_to_ciphertexts(instruction.global_record)):
            payload[wire.ciphertext_name(i)] = np.frombuffer(blob, dtype=np.uint8)
        payload |= {_SITE_PREFIX + n: np.asarray(t) for n, t in tensors.items()}
        self._store(facts.training_id, facts.server_round).save(payload)
        history = self.history(facts.training_id)
        history[str(facts.server_round)] = {"metrics": facts.metrics,
                                            "train_examples": facts.train_examples}
        write_atomically(self._history_path(facts.training_id),
                         json.dumps(history, indent=1, sort_keys=True).encode())
        for old in self.rounds(facts.training_id)[:-KEPT_ROUNDS]:
            path = self._store(facts.training_id, old).path
            assert path is not None
            path.unlink(missing_ok=True)

    def trainings(self) -> list[str]:
        """Training ids with at least one exportable round, the most recently scored last."""
        latest: dict[str, float] = {}
        for path in self._files():
            if match := _ROUND.match(path.name):
                training = match["training"]
                latest[training] = max(latest.get(training, 0.0), path.stat().st_mtime)
        return sorted(latest, key=lambda training: (latest[training], training))

    def rounds(self, training_id: str) -> list[int]:
        """The exportable rounds of one training, in order."""
        return sorted(int(m["round"]) for p in self._files()
                      if (m := _ROUND.match(p.name)) and m["training"] == path_part(training_id))

    def history(self, training_id: str) -> dict[str, dict[str, object]]:
        """{round: {"metrics": ..., "train_examples": n}} of every round scored, kept or not."""
        path = self._history_path(training_id)
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self, training_id: str, server_round: int) -> ArchivedRound:
        """One kept round; ArchiveError when it is not kept or its file is unreadable."""
        if server_round not in self.rounds(training_id):
            raise ArchiveError(f"site {self.site} keeps rounds {self.rounds(training_id)} of "
                               f"training {training_id}, not round {server_round}: pass one of "
                               f"them with --round")
        store = self._store(training_id, server_round)
        try:
            stored = store.load()
            assert stored is not None  # listed just above
            facts = RoundFacts(**json.loads(stored.pop(_FACTS).tobytes()))
        except (PersonalStoreError, KeyError, TypeError, ValueError) as err:
            raise ArchiveError(f"{store.path} is damaged ({err}): export another round with "
                               f"--round (kept: {self.rounds(training_id)})") from None
        ciphertexts: list[bytes] = []
        while (name := wire.ciphertext_name(len(ciphertexts))) in stored:
            ciphertexts.append(stored[name].tobytes())
        tensors = {n[len(_SITE_PREFIX):]: t for n, t in stored.items()
                   if n.startswith(_SITE_PREFIX)}
        return ArchivedRound(facts, ciphertexts, tensors)

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("run-*.round-*.npz")) if self.folder.is_dir() else []

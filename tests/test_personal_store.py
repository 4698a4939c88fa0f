"""Personal tensors survive rounds in Context.state and a SuperNode restart on disk."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedhealth.core.personalization import PERSONAL_MODEL_PREFIX
from sites.personal_store import ACCEPTED_GLOBAL, PersonalStore, PersonalStoreError

TENSORS = {
    "features.norm0.weight": np.linspace(0, 1, 16, dtype=np.float32),
    "features.norm0.num_batches_tracked": np.array(7, dtype=np.int64),
    PERSONAL_MODEL_PREFIX + "class_layers.out.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
}


def _context(run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _store(context: Context, state_dir: Path | None, site: str = "hospital-a") -> PersonalStore:
    return PersonalStore(context.state, state_dir, run_key=str(context.run_id), site=site)


def _assert_same(got: dict[str, np.ndarray] | None, want: dict[str, np.ndarray]) -> None:
    assert got is not None and list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value)


def test_nothing_stored_is_none(tmp_path: Path) -> None:
    assert _store(_context(), tmp_path).load() is None
    assert _store(_context(), None).load() is None


def test_round_trip_through_context_state() -> None:
    context = _context()
    _store(context, None).save(TENSORS)
    assert any(key.startswith("fedhealth.personal") for key in context.state)
    _assert_same(_store(context, None).load(), TENSORS)


def test_a_restarted_node_resumes_from_disk(tmp_path: Path) -> None:
    _store(_context(), tmp_path).save(TENSORS)
    restarted = _context()  # a new process: empty Context.state, same run and state dir
    store = _store(restarted, tmp_path)
    _assert_same(store.load(), TENSORS)
    assert store.key in restarted.state  # and later rounds read it from memory again
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp files


def test_context_state_wins_over_disk(tmp_path: Path) -> None:
    context = _context()
    _store(context, tmp_path).save(TENSORS)
    _store(_context(), tmp_path).save({"other": np.zeros(2, dtype=np.float32)})
    _assert_same(_store(context, tmp_path).load(), TENSORS)


def test_runs_and_sites_do_not_mix(tmp_path: Path) -> None:
    _store(_context(run_id=1), tmp_path).save(TENSORS)
    assert _store(_context(run_id=2), tmp_path).load() is None
    assert _store(_context(run_id=1), tmp_path, site="hospital-b").load() is None
    shared_state = _context(run_id=1)  # two virtual sites in one process share nothing either
    _store(shared_state, None, site="a").save(TENSORS)
    assert _store(shared_state, None, site="b").load() is None


def test_saving_again_replaces_and_an_empty_set_is_not_none(tmp_path: Path) -> None:
    store = _store(_context(), tmp_path)
    store.save(TENSORS)
    store.save({})
    assert _store(_context(), tmp_path).load() == {}


def test_a_corrupt_file_names_itself_and_the_fix(tmp_path: Path) -> None:
    store = _store(_context(), tmp_path)
    store.save(TENSORS)
    store.path.write_bytes(store.path.read_bytes()[:40])
    with pytest.raises(PersonalStoreError, match=rf"{store.path.name}.*Delete the file"):
        _store(_context(), tmp_path).load()


def test_unsafe_site_names_stay_inside_the_state_dir(tmp_path: Path) -> None:
    store = _store(_context(), tmp_path, site="../../etc")
    store.save(TENSORS)
    assert tmp_path in store.path.parents


def test_truncated_file_names_itself_and_the_fix(tmp_path: Path) -> None:
    store = _store(_context(), tmp_path)
    store.save(TENSORS)
    assert store.path is not None
    store.path.write_bytes(store.path.read_bytes()[:40])
    with pytest.raises(PersonalStoreError, match=r"run-1\.npz.*Delete the file"):
        _store(_context(), tmp_path).load()


def test_the_accepted_global_is_kept_apart_from_the_personal_layers(tmp_path: Path) -> None:
    context = _context()
    personal = _store(context, tmp_path)
    accepted = PersonalStore(context.state, tmp_path, run_key="1", site="hospital-a",
                             kind=ACCEPTED_GLOBAL)
    personal.save(TENSORS)
    accepted.save({"w": np.ones(3)})
    assert accepted.path is not None and accepted.path.parent.parent.name == ACCEPTED_GLOBAL
    _assert_same(personal.load(), TENSORS)
    _assert_same(PersonalStore(None, tmp_path, run_key="1", site="hospital-a",
                               kind=ACCEPTED_GLOBAL).load(), {"w": np.ones(3)})

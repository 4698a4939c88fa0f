"""Whole federations in Flower's simulation engine, on synthetic DICOM hospitals.

Real ClientApp, real ServerApp, real TenSEAL ciphertexts, real Ray workers; only sizes are small.
"""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import sites.client_app as client_app
from fedhealth.app.server_app import wait_for_sites
from fedhealth.app.simulation import simulate
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import load_aggregator_context
from fedhealth.core.crypto.codec import RoundBinding, decrypt_global
from fedhealth.core.crypto.keys import load_site_context
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.models import build_model
from fedhealth.core.personalization import get_policy
from fedhealth.core.synth import synthesize_federation
from strategies.encrypted_fedavg import EncryptedFedAvg

pytestmark = pytest.mark.slow  # starts real federations

ROUNDS = 2
PROGRESS_SAMPLE = 4  # test images a site scores before the last round (each test split is larger)
CONFIG = RunConfig(num_server_rounds=ROUNDS, policy="fedavg", local_epochs=15, optimizer="sgd",
                   learning_rate=0.1, seed=0, progress_test_images=PROGRESS_SAMPLE)
# Each policy's encrypted and plaintext runs; fedbn trains with Adam, which once turned CKKS
# noise into 0.05 of per-site balanced accuracy within 8 rounds
POLICY_CHANGES: dict[str, dict[str, object]] = {
    "fedavg": {}, "fedbn": {"policy": "fedbn", "optimizer": "adam", "learning_rate": 3e-3,
                            "local_epochs": 3}}
RunKey = tuple[str, bool]  # (policy, encrypted)


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three same-vendor, balanced sites: learnable in two short rounds (non-IID: `compare`)."""
    root = tmp_path_factory.mktemp("federation")
    synthesize_federation(root, 3, seed=11, images_per_site=(90, 75, 60), label_skew=0.0,
                          scanner_shift=0.0)
    return root


def _config(hospitals: Path, key_dir: Path, out: Path, **changes: object) -> RunConfig:
    return replace(CONFIG, data_dir=str(hospitals), key_dir=str(key_dir), out_dir=str(out),
                   state_dir=str(out / "state"), **changes)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[RunKey, Path]:
    return {(policy, encrypted): tmp_path_factory.mktemp("run")
            for policy in POLICY_CHANGES for encrypted in (True, False)}


@pytest.fixture(scope="module")
def runs(hospitals: Path, key_dir: Path, run_dirs: dict[RunKey, Path]) -> dict[RunKey, dict]:
    """The same federation, seed and schedule, encrypted and in plaintext, for each policy."""
    return {(policy, encrypted): simulate(_config(hospitals, key_dir, out, encrypted=encrypted,
                                                  **POLICY_CHANGES[policy]))
            for (policy, encrypted), out in run_dirs.items()}


def _mean(by_site: dict[str, dict[str, float]], metric: str) -> float:
    return float(np.mean([m[metric] for m in by_site.values()]))


def test_encrypted_federation_beats_round_zero(runs: dict[RunKey, dict]) -> None:
    by_round = runs["fedavg", True]["evaluate_by_round"]
    assert set(by_round) == {str(r) for r in range(ROUNDS + 1)}
    # every site in every round, round 0 included: the ServerApp waits for late joiners
    assert [len(sites) for sites in by_round.values()] == [3] * (ROUNDS + 1)
    # AUC: threshold-free, so it shows learning before label skew lets the threshold settle
    assert _mean(by_round[str(ROUNDS)], "auc") > _mean(by_round["0"], "auc") + 0.1


@pytest.mark.parametrize("policy", sorted(POLICY_CHANGES))
def test_encrypted_and_plaintext_agree_on_every_site(runs: dict[RunKey, dict],
                                                     policy: str) -> None:
    """Exactly: both modes sum the same grid terms exactly and divide by the same s, so every
    site trains from the same global, bit for bit, and reports the same metrics."""
    encrypted, plaintext = runs[policy, True], runs[policy, False]
    sites = {"hospital-1", "hospital-2", "hospital-3"}
    for kind in ("evaluate_by_round", "train_by_round"):
        assert set(encrypted[kind]) == set(plaintext[kind]), kind
        for server_round, by_site in encrypted[kind].items():
            assert set(by_site) == sites, (kind, server_round)
            assert by_site == plaintext[kind][server_round], (kind, server_round)
    assert encrypted["per_site"] == plaintext["per_site"]
    # the runs learned something, so agreeing is not agreeing on a model that never moved
    assert encrypted["train_by_round"]["2"] != encrypted["train_by_round"]["1"]
    # Ciphertexts cost bytes: the uplink grows, but by a bounded factor (default preset:
    # 16 B/param against float32's 4, plus per-record framing)
    ratio = encrypted["uplink_bytes_per_round"] / plaintext["uplink_bytes_per_round"]
    assert 2 < ratio < 6


def test_encrypted_run_leaves_a_checkpoint_the_aggregator_resumes_from(
        runs: dict[RunKey, dict], run_dirs: dict[RunKey, Path], key_dir: Path) -> None:
    assert runs["fedavg", True]["encrypted"] is True
    strategy = EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                               checkpoint_dir=run_dirs["fedavg", True] / wire.CHECKPOINT_DIR,
                               resume=True)
    assert strategy.completed_rounds == ROUNDS
    assert len(strategy.global_record()) > 0
    # the checkpointed history is the one results.json reports
    assert strategy.history.by_round_json("evaluate") == runs["fedavg", True]["evaluate_by_round"]
    # rounds before the last score a fixed sample (the curve); the last, the whole test split
    scored = {r: {rec.num_examples for rec in sites.values()}
              for r, sites in strategy.history.records["evaluate"].items()}
    assert all(scored[r] == {PROGRESS_SAMPLE} for r in range(ROUNDS))
    assert min(scored[ROUNDS]) > PROGRESS_SAMPLE


def test_resumed_federation_continues_the_training_and_reports_every_round(
        hospitals: Path, key_dir: Path, runs: dict[RunKey, dict],
        run_dirs: dict[RunKey, Path], tmp_path: Path) -> None:
    out = tmp_path / "coordinator"
    shutil.copytree(run_dirs["fedavg", True], out)  # the finished run's checkpoint and site state
    results = simulate(_config(hospitals, key_dir, out, num_server_rounds=ROUNDS + 1,
                               resume=True))
    assert sorted(results["evaluate_by_round"], key=int) == [str(r) for r in range(ROUNDS + 2)]
    assert results["evaluate_by_round"]["0"] == runs["fedavg", True]["evaluate_by_round"]["0"]
    strategy = EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                               checkpoint_dir=out / wire.CHECKPOINT_DIR, resume=True)
    assert strategy.completed_rounds == ROUNDS + 1


def test_empty_site_fails_clearly_while_the_others_continue(
        hospitals: Path, key_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for site in ("hospital-1", "hospital-2"):
        shutil.copytree(hospitals / site, data / site)
    (data / "hospital-3").mkdir()
    results = simulate(_config(data, key_dir, tmp_path / "out", num_server_rounds=1))
    assert set(results["per_site"]) == {"hospital-1", "hospital-2"}
    # its failures are recorded (census, then every evaluation it was asked for), without a path
    kinds = [r["kind"] for r in results["rejected"]]
    assert kinds.count("census") == 1 and kinds.count("evaluate") == 2
    assert len({r["node_id"] for r in results["rejected"]}) == 1
    for rejection in results["rejected"]:
        assert rejection["reason"].startswith("the site reported an error")
        assert str(tmp_path) not in rejection["reason"]


def test_encrypted_unet_segmentation_federation_reports_dice(key_dir: Path,
                                                            tmp_path: Path) -> None:
    synthesize_federation(tmp_path / "data", 2, seed=5, images_per_site=24,
                          segmentation_masks=True)
    results = simulate(_config(tmp_path / "data", key_dir, tmp_path / "out", model="unet",
                               policy="fedbn", num_server_rounds=1, local_epochs=1))
    assert set(results["evaluate_by_round"]) == {"0", "1"}
    for metrics in results["per_site"].values():
        assert set(metrics) == {"dice"} and 0.0 <= metrics["dice"] <= 1.0
    assert results["uplink_bytes_per_round"] > 0


class _JoiningGrid:
    """Nodes connect one per poll, as SuperNodes do after the ServerApp has started."""

    def __init__(self, nodes: int) -> None:
        self.nodes, self.polls = nodes, 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(range(min(self.polls, self.nodes)))


def test_server_waits_for_expected_sites_then_for_no_longer_than_join_timeout() -> None:
    grid = _JoiningGrid(nodes=3)
    assert wait_for_sites(grid, replace(CONFIG, expected_sites=3), poll_seconds=0) == 3
    stuck = _JoiningGrid(nodes=2)
    config = replace(CONFIG, expected_sites=3, join_timeout=0.05)
    assert wait_for_sites(stuck, config, poll_seconds=0.01) == 2
    assert stuck.polls > 1  # it kept polling until the timeout, then started with those there


# --------------------------------------------------------------- what a site sends
def _train_message(config: RunConfig, content: RecordDict) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 0, 0
    record = config.to_record()
    record["server-round"] = 1
    content["config"] = record
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=9, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _partition(config: RunConfig, num_classes: int = 2) -> tuple[tuple[str, ...], tuple[str, ...]]:
    model = build_model(config.model, num_classes=num_classes, image_size=config.image_size)
    partition = get_policy(config.policy).partition(model)
    return partition.shared, partition.personal


@pytest.mark.parametrize("policy", ["fedbn", "fedper", "ditto"])
def test_plaintext_reply_holds_exactly_the_shared_tensors(
        policy: str, hospitals: Path, key_dir: Path, tmp_path: Path) -> None:
    config = _config(hospitals, key_dir, tmp_path, policy=policy, encrypted=False,
                     local_epochs=1)
    context = _context()
    # round 1 as Flower's FedAvg sends it: no arrays yet, the site builds the model from the seed
    reply = client_app.train(_train_message(config, RecordDict({"arrays": ArrayRecord()})), context)
    shared, personal = _partition(config)
    assert list(reply.content["arrays"].keys()) == list(shared)
    assert not set(reply.content["arrays"].keys()) & set(personal)
    stored = next(iter(context.state.array_records.values()))
    assert set(personal) <= set(stored.keys())  # what stayed is in the site store


@pytest.mark.parametrize("policy", ["fedbn", "fedper"])
def test_encrypted_reply_decrypts_to_the_shared_tensors_only(
        policy: str, hospitals: Path, key_dir: Path, tmp_path: Path) -> None:
    config = _config(hospitals, key_dir, tmp_path, policy=policy, local_epochs=1)
    instruction = {wire.CRYPTO: _round_one_crypto(key_dir)}
    context = _context()
    reply = client_app.train(_train_message(config, RecordDict(instruction)), context)
    assert set(reply.content.array_records) == {wire.UPDATE}
    for array in reply.content[wire.UPDATE].values():
        assert array.dtype == "uint8"  # ciphertext bytes, nothing else
    shared_names, personal_names = _partition(config)
    stored = next(iter(context.state.array_records.values()))
    personal = {n: stored[n].numpy() for n in personal_names}
    # on disk under the training id, which survives a coordinator restart (Flower's run id does not)
    assert (tmp_path / "state" / "hospital-1" / "personal" / "hospital-1" / "run-t1.npz").exists()
    site_key = load_site_context(key_dir / "site.ctx")
    model = build_model(config.model, image_size=config.image_size)
    shared_layout = TensorLayout.of({n: t.numpy() for n, t in model.state_dict().items()
                                     if n in shared_names})
    weight = float(reply.content[wire.CRYPTO][wire.SITE_WEIGHT])
    sent = decrypt_global(site_key, reply.content[wire.UPDATE], shared_layout, weight,
                          binding=RoundBinding("t1", 1))  # check values of training t1, round 1
    assert list(sent) == list(shared_names)
    sent_values = np.concatenate([v.ravel() for v in sent.values()])
    for name, tensor in personal.items():  # no personal tensor hides in the shared payload
        if tensor.size >= 4 and np.issubdtype(tensor.dtype, np.floating):
            assert not np.isin(np.round(tensor.ravel(), 5), np.round(sent_values, 5)).all(), name


def _round_one_crypto(key_dir: Path) -> ConfigRecord:
    key = load_site_context(key_dir / "site.ctx")
    return ConfigRecord({wire.SERVER_ROUND: 1, wire.WEIGHT_SUM: 0.0, wire.SITE_WEIGHT: 0.5,
                         wire.LAYOUT_HASH: "", wire.FINGERPRINT: key.fingerprint,
                         wire.TRAINING_ID: "t1"})

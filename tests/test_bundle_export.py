"""What a hospital takes home: its model as a MONAI Bundle, and predictions on new studies.

One small encrypted federation per policy (2 sites, 1 round, real TenSEAL, real Flower, real
DICOM), on one SuperLink; every site exports its bundle and `site predict` on its test split
must give back its last-round evaluation metrics exactly.

The federation trains on what its sites pulled from their PACS: each hospital's images are
uploaded to its own Orthanc, and `fedhealth site pull` (DICOMweb for one site, DIMSE for the
other) fills the site folders the runs read, with the hospital's label manifest beside them.
"""

import csv
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orthanc as pacs  # tests/orthanc.py: a real Orthanc per site
import pydicom
import pytest
import torch
from monai.bundle import verify_net_in_out
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.simulation import local_superlink, simulate
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.keys import init_key_files
from fedhealth.core.crypto.messages import Instruction
from fedhealth.core.models import build_model
from fedhealth.core.run_history import EVALUATE, TRAIN, RunHistory
from fedhealth.core.synth import synthesize_federation
from sites.audit import AuditLog
from sites.bundle_export import ExportError, export_bundle, write_bundle
from sites.bundle_layout import INFERENCE, METADATA, PROBABILITIES_FILE, BundleFacts
from sites.bundle_predict import predict, write_csv
from sites.dataset import index_site
from sites.dicom_files import scan_tree
from sites.round_archive import KEPT_ROUNDS, RoundArchive, RoundFacts
from sites.site_check import check_site
from sites.training import classification_metrics

pytestmark = pytest.mark.slow  # starts real federations

POLICIES = ("fedavg", "fedbn", "ditto")
SITES = ("hospital-1", "hospital-2")
PROTOCOLS = dict(zip(SITES, ("dicomweb", "dimse"), strict=True))  # how each site reaches its PACS
IMAGES = 30
CONFIG = RunConfig(num_server_rounds=1, local_epochs=1, seed=0)
METRICS = ("accuracy", "balanced_accuracy", "balanced_accuracy_se", "auc", "auc_defined", "loss")
# Python code that makes fedhealth's site and aggregator packages, its app, its crypto, Flower and
# TenSEAL unimportable, leaving of fedhealth only the model zoo: what a department without
# fedhealth has once it holds the zoo's module
ZOO_ONLY = """
import importlib.abc, sys
ZOO = ("fedhealth", "fedhealth.core", "fedhealth.core.models")
class ZooOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ("sites", "strategies", "flwr", "tenseal") or (
                top == "fedhealth" and name not in ZOO):
            raise ModuleNotFoundError(f"{name} is not installed here", name=name)
assert not [m for m in sys.modules if m.partition(".")[0] in ("sites", "fedhealth")]
sys.meta_path.insert(0, ZooOnly())
"""


@dataclass(frozen=True)
class Pulled:
    """One site's `site pull`: what the command printed, and its hospital's uploaded files
    (SOPInstanceUID -> bytes as synthesized and sent to the PACS)."""

    output: str
    uploaded: dict[str, bytes]
    audit_log: Path


@dataclass(frozen=True)
class PulledFederation:
    """The federation folder the runs train on, and how each of its sites was filled."""

    root: Path
    sites: dict[str, Pulled]


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hospitals as their PACS hold them (each folder is uploaded to its site's Orthanc)."""
    root = tmp_path_factory.mktemp("uploads")
    synthesize_federation(root, len(SITES), seed=3, images_per_site=IMAGES)
    return root


@pytest.fixture(scope="module")
def pulls(uploads: Path, tmp_path_factory: pytest.TempPathFactory,
          free_port: Callable[[], int]) -> PulledFederation:
    """Each site pulls its hospital from its own Orthanc into hospitals/<site>, the folder the
    federation trains on. The label manifest is the hospital's, not the PACS's: it is put at the
    top of the site folder and names the cohort (`--labels`). Orthanc is stopped before any
    training, so the runs can only read what was pulled."""
    pacs.skip_without_orthanc()
    root = tmp_path_factory.mktemp("hospitals")
    secrets = tmp_path_factory.mktemp("secrets")
    password_file = pacs.write_password_file(secrets)
    done = {}
    for site, protocol in PROTOCOLS.items():
        files = sorted(p for p in (uploads / site).rglob("*")  # some vendors' files lack .dcm
                       if p.is_file() and p.name != wire.LABELS_FILE)
        with pacs.running_orthanc(tmp_path_factory.mktemp(f"orthanc-{site}"), free_port(),
                             free_port()) as orthanc:
            assert len(orthanc.upload(files)) == len(files) == IMAGES
            out = root / site
            out.mkdir()
            shutil.copy(uploads / site / wire.LABELS_FILE, out / wire.LABELS_FILE)
            audit_log = secrets / f"{site}.audit.jsonl"
            result = CliRunner().invoke(app, [
                "site", "pull", "--out", str(out), *_pacs_options(orthanc, protocol, password_file),
                "--labels", str(out / wire.LABELS_FILE), "--audit-log", str(audit_log)])
        assert result.exit_code == 0, result.output
        done[site] = Pulled(result.output, pacs.by_sop_uid(files), audit_log)
    return PulledFederation(root, done)


def _pacs_options(orthanc: pacs.Orthanc, protocol: str, password_file: Path) -> list[str]:
    return (orthanc.dicomweb_options(password_file) if protocol == "dicomweb"
            else orthanc.dimse_options())


@pytest.fixture(scope="module")
def hospitals(pulls: PulledFederation) -> Path:
    return pulls.root


@pytest.fixture(scope="module")
def runs(hospitals: Path, key_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """{policy: (out dir, results)}: one encrypted run per policy, on one SuperLink."""
    done = {}
    with local_superlink() as link:
        for policy in POLICIES:
            out = tmp_path_factory.mktemp(policy)
            config = replace(CONFIG, policy=policy, data_dir=str(hospitals), key_dir=str(key_dir),
                             out_dir=str(out), state_dir=str(out / "state"))
            done[policy] = out, simulate(config, superlink=link)
    return done


def test_each_site_trained_on_what_it_pulled_from_its_own_pacs(
        pulls: PulledFederation, uploads: Path, runs: dict[str, tuple[Path, dict]]) -> None:
    for site, protocol in PROTOCOLS.items():
        pulled = pulls.sites[site]
        assert f"{IMAGES} new instances" in pulled.output
        (entry,) = AuditLog(pulled.audit_log).entries()
        assert (entry["protocol"], entry["instances"], entry["error"]) == (protocol, IMAGES, None)
        files = {sop: path.read_bytes() for sop, path in pacs.pulled_files(pulls.root / site).items()}
        assert files.keys() == pulled.uploaded.keys()
        if protocol == "dicomweb":
            assert files == pulled.uploaded  # the bytes the hospital sent, bit for bit
        else:  # DIMSE sends data sets: same syntax, pixels and values
            assert [sop for sop, data in files.items()
                    if not pacs.same_instance(data, pulled.uploaded[sop])] == []
        check = check_site(pulls.root / site)
        assert check.images == IMAGES
        assert pacs.comparable(check) == pacs.comparable(check_site(uploads / site))
        # every run trained and evaluated on the pulled folder's splits, as `site check` counts them
        split_sizes = {TRAIN: sum(check.labels["train"].values()),
                       EVALUATE: sum(check.labels["test"].values())}
        for policy, (out, _) in runs.items():
            path = out / wire.CHECKPOINT_DIR / wire.HISTORY_FILE
            history = RunHistory.from_json(json.loads(path.read_text()), str(path))
            assert {kind: history.sites(kind, CONFIG.num_server_rounds)[site].num_examples
                    for kind in split_sizes} == split_sizes, (policy, site)


def _test_split(site_dir: Path, into: Path) -> dict[str, int]:
    """Copy the site's test split (as training split it) into `into`, same relative paths, so
    it scans in the evaluation's order; return {series uid: label}."""
    labels = {}
    for item in index_site(site_dir, seed=CONFIG.seed).in_split("test"):
        target = into / item.image.path.relative_to(site_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item.image.path, target)
        labels[item.image.series_uid] = item.label
    return labels


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("policy", POLICIES)
def test_predict_on_the_test_split_reproduces_the_last_round_metrics(
        policy: str, runs: dict[str, tuple[Path, dict]], hospitals: Path, key_dir: Path,
        tmp_path: Path) -> None:
    out, results = runs[policy]
    reported = results["evaluate_by_round"][str(CONFIG.num_server_rounds)]
    for site in SITES:
        bundle = export_bundle(out / "state" / site, key_dir / wire.SITE_KEY_FILE,
                               tmp_path / site / "bundle")
        assert (bundle.facts.site, bundle.facts.policy, bundle.facts.server_round) == (
            site, policy, CONFIG.num_server_rounds)
        labels = _test_split(hospitals / site, tmp_path / site / "test")
        csv_path = write_csv(predict(bundle.path, tmp_path / site / "test"),
                             tmp_path / site / "predictions.csv", bundle.facts.num_classes)
        rows = _read_csv(csv_path)
        assert [r["series_uid"] for r in rows] == list(labels)  # one row per series, in order
        logits = torch.tensor([[float(r["logit_0"]), float(r["logit_1"])] for r in rows])
        truth = torch.tensor([labels[r["series_uid"]] for r in rows])
        metrics = classification_metrics(logits, truth, threshold=bundle.facts.threshold)
        metrics["loss"] = torch.nn.CrossEntropyLoss()(logits, truth).item()
        assert {m: metrics[m] for m in METRICS} == {m: reported[site][m] for m in METRICS}, site
        # the CSV's class is the site's operating point applied to its probabilities
        threshold = bundle.facts.threshold
        assert threshold is not None  # a binary classifier with a validation split
        assert [int(r["predicted"]) for r in rows] == [
            int(float(r["probability_1"]) >= threshold) for r in rows]
    # the export left the federation's protection: the site's audit log says so, with hashes
    exports = [e for e in AuditLog(out / "state" / SITES[-1] / "audit.jsonl").entries()
               if e["kind"] == "export"]
    assert len(exports) == 1 and exports[0]["files"] == bundle.sha256


def test_monai_runs_the_bundle_as_site_predict_does(runs: dict[str, tuple[Path, dict]],
                                                    hospitals: Path, key_dir: Path,
                                                    tmp_path: Path) -> None:
    out, _ = runs["fedbn"]
    bundle = export_bundle(out / "state" / SITES[0], key_dir / wire.SITE_KEY_FILE,
                           tmp_path / "bundle").path
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / METADATA),
                      config_file=str(bundle / INFERENCE), device="cpu")
    for site in SITES:  # the site's own scanner's studies, and another's
        _test_split(hospitals / site, tmp_path / "studies")
    assert {pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation
            for p in (tmp_path / "studies").rglob("*") if p.is_file()} == {
        "MONOCHROME1", "MONOCHROME2"}  # the data list's flag decides, both ways
    (tmp_path / "studies" / "notes.txt").write_text("not DICOM: both runs pass it over\n")
    # the claim: it runs with no fedhealth code but the zoo's (and the block does block)
    blocked = subprocess.run([sys.executable, "-c", ZOO_ONLY + "import sites.dataset"],
                             capture_output=True, text=True)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr
    run_monai = "import runpy; runpy.run_module('monai.bundle', run_name='__main__')"
    subprocess.run([sys.executable, "-c", ZOO_ONLY + run_monai, "run", "--config_file",
                    str(bundle / INFERENCE), "--bundle_root", str(bundle), "--dataset_dir",
                    str(tmp_path / "studies"), "--output_dir", str(tmp_path / "monai")],
                   check=True, capture_output=True)
    with (tmp_path / "monai" / PROBABILITIES_FILE).open() as handle:
        by_monai = [[float(v) for v in row[1:]] for row in csv.reader(handle)]
    ours = predict(bundle, tmp_path / "studies").series
    assert len(by_monai) == len(ours) > 0
    assert by_monai == [list(row.probabilities) for row in ours]


def test_export_refuses_the_wrong_keys_an_unknown_training_and_a_corrupted_global(
        runs: dict[str, tuple[Path, dict]], key_dir: Path, tmp_path: Path) -> None:
    out, _ = runs["fedavg"]
    state = out / "state" / SITES[0]
    site_key = key_dir / wire.SITE_KEY_FILE
    with pytest.raises(ExportError, match="no secret key.*aggregator"):
        export_bundle(state, key_dir / wire.AGGREGATOR_KEY_FILE, tmp_path / "a")
    init_key_files(tmp_path / "other")
    with pytest.raises(ExportError, match="another federation's"):
        export_bundle(state, tmp_path / "other" / wire.SITE_KEY_FILE, tmp_path / "b")
    with pytest.raises(ExportError, match=f"{SITES[0]} never took part in training nope"):
        export_bundle(state, site_key, tmp_path / "c", training_id="nope")
    with pytest.raises(ExportError, match="keeps rounds \\[1\\].*not round 7"):
        export_bundle(state, site_key, tmp_path / "d", server_round=7)
    damaged = tmp_path / "damaged"
    shutil.copytree(state, damaged)
    (stored,) = damaged.glob("received-global/*/run-*.round-1.npz")
    with np.load(stored) as saved:
        arrays = {name: saved[name].copy() for name in saved.files}
    arrays[wire.ciphertext_name(0)][-100] ^= 0x01  # one bit of the first ciphertext
    np.savez(stored, **arrays)
    with pytest.raises(ExportError, match="refused, not exported.*round 1"):
        export_bundle(damaged, site_key, tmp_path / "e")
    stored.write_bytes(stored.read_bytes()[:1000])  # a truncated file, as after a full disk
    with pytest.raises(ExportError, match="is damaged.*--round"):
        export_bundle(damaged, site_key, tmp_path / "f")
    assert not any((tmp_path / p).exists() for p in "abcdef")  # nothing written on refusal


def test_site_export_and_predict_commands_with_a_site_toml(
        runs: dict[str, tuple[Path, dict]], hospitals: Path, key_dir: Path,
        tmp_path: Path) -> None:
    out, _ = runs["ditto"]
    site = SITES[1]
    toml = tmp_path / "site.toml"
    toml.write_text(f"""[site]
name = "{site}"
data-dir = "{hospitals / site}"
state-dir = "{out / "state" / site}"
audit-log = "{tmp_path / "audit.jsonl"}"
[superlink]
address = "127.0.0.1:9092"
ca-cert = "ca.pem"
[keys]
node-private-key = "node.key"
key-file = "{key_dir / wire.SITE_KEY_FILE}"
""")
    runner = CliRunner()
    exported = runner.invoke(app, ["site", "export", "--config", str(toml),
                                   "--out", str(tmp_path / "bundle")])
    assert exported.exit_code == 0, exported.output
    assert BundleFacts.read(tmp_path / "bundle").policy == "ditto"
    assert [e["kind"] for e in AuditLog(tmp_path / "audit.jsonl").entries()] == ["export"]
    predicted = runner.invoke(app, ["site", "predict", "--bundle", str(tmp_path / "bundle"),
                                    str(hospitals / site), "--out", str(tmp_path / "p.csv")])
    assert predicted.exit_code == 0, predicted.output
    rows = _read_csv(tmp_path / "p.csv")
    assert len(rows) == IMAGES and all(
        abs(float(r["probability_0"]) + float(r["probability_1"]) - 1) < 1e-6 for r in rows)
    refused = runner.invoke(app, ["site", "export", "--config", str(toml), "--out",
                                  str(tmp_path / "again"), "--training-id", "nope"])
    assert refused.exit_code == 2 and "never took part in training nope" in refused.output


def test_a_site_keeps_the_newest_rounds_and_every_rounds_metrics(tmp_path: Path) -> None:
    archive = RoundArchive(tmp_path, "h1")
    for server_round in range(1, KEPT_ROUNDS + 3):
        instruction = Instruction(server_round, wire.ciphertexts_to_record([b"ct"]), 1.0, 0.5,
                                  "layout", "key", "t1", config=None,  # type: ignore[arg-type]
                                  global_round=server_round)
        facts = RoundFacts("h1", "t1", server_round, {}, {}, [], {}, 0.5,
                           {"auc": server_round / 10}, 20)
        archive.keep(instruction, facts, {"w": np.full(2, server_round, np.float32)})
    assert archive.rounds("t1") == list(range(3, KEPT_ROUNDS + 3))
    assert sorted(archive.history("t1"), key=int) == [str(r) for r in range(1, KEPT_ROUNDS + 3)]
    kept = archive.load("t1", KEPT_ROUNDS + 2)
    assert kept.ciphertexts == [b"ct"] and kept.facts.metrics == {"auc": 0.5}
    assert np.array_equal(kept.site_tensors["w"], np.full(2, KEPT_ROUNDS + 2, np.float32))
    assert archive.trainings() == ["t1"]


def test_a_segmentation_bundle_writes_a_dicom_seg_on_each_source_image(tmp_path: Path) -> None:
    synthesize_federation(tmp_path / "data", 1, seed=5, images_per_site=6,
                          segmentation_masks=True)
    facts = BundleFacts(site="hospital-1", training_id="t", server_round=1, policy="fedbn",
                        model="unet", task="segmentation", num_classes=2, image_size=64, in_channels=1,
                        batch_size=4, max_image_mb=200.0, threshold=None,
                        crypto_preset="default", key_fingerprint="f", preprocessing=[])
    network = build_model("unet", num_classes=2, image_size=64, seed=1)
    write_bundle(tmp_path / "bundle", facts, network, "card")
    studies = tmp_path / "data" / "hospital-1"
    predictions = predict(tmp_path / "bundle", studies, tmp_path / "seg")
    sources = {i.sop_uid: i for i in scan_tree(studies).images}
    segs = sorted((tmp_path / "seg").glob("*.seg.dcm"))
    assert len(segs) == len(sources) == len(predictions.series) == 6
    by_series = {r.series_uid: r for r in predictions.series}
    for path in segs:
        seg = pydicom.dcmread(path)
        assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        source = sources.pop(referenced.ReferencedSOPInstanceUID)  # one SEG per source image
        assert (seg.Rows, seg.Columns) == (source.rows, source.columns)
        assert seg.StudyInstanceUID == source.study_uid
        # the CSV row's class share is the SEG's own foreground
        share = float(np.asarray(seg.pixel_array, dtype=np.float64).mean())
        assert by_series[source.series_uid].probabilities[1] == pytest.approx(share)
    assert not sources

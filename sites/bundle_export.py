"""Export one round's model of one training, as its site scored it, to a MONAI Bundle.

Only a site can: the global it received is filed encrypted (sites.round_archive), so exporting
decrypts it again with the site key, which re-runs every check a received global passes
(fingerprint, layout, check values, grid: `messages.Instruction.global_tensors`); a corrupted
file is refused, not exported. The site's own tensors are laid over it, giving the model exactly
as the site scored it (personal layers, FedBN's own normalisation statistics, or Ditto's personal
model), with the operating threshold it chose. The export is written to the site's audit log:
from here on the model is outside the federation's protection.
"""

import hashlib
import importlib.metadata
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedhealth.core.atomic_file import write_atomically
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.codec import IntegrityError
from fedhealth.core.crypto.keys import KeyFileError, SiteKey, load_site_context
from fedhealth.core.crypto.messages import InstructionError
from sites.audit import AuditLog
from sites.bundle_layout import (
    FILES,
    INFERENCE,
    METADATA,
    MODEL_CARD,
    PROBABILITIES_FILE,
    SECTION,
    WEIGHTS,
    BundleFacts,
    inference_config,
)
from sites.data_limits import DataLimits
from sites.personal_store import RECEIVED_GLOBAL
from sites.pipeline_config import BUNDLE_READER, pipeline_steps
from sites.round_archive import ArchivedRound, ArchiveError, RoundArchive

if TYPE_CHECKING:  # torch loads when an export runs, not with `fedhealth --help`
    import torch

MONAI_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                "0.8.1/meta_schema_20220324.json")


class ExportError(ValueError):
    """The site cannot export what was asked; the message says why and what to pass instead."""


@dataclass(frozen=True)
class ExportedBundle:
    """A written bundle: where, what, and the sha256 of each of its files."""

    path: Path
    facts: BundleFacts
    sha256: dict[str, str]


def export_bundle(state_dir: Path, key_file: Path, out: Path, *, site: str | None = None,
                  training_id: str | None = None, server_round: int | None = None,
                  audit_log: Path | None = None) -> ExportedBundle:
    """Write the bundle of `site`'s round `server_round` of `training_id` into `out`.

    Defaults: the only site with exportable rounds in `state_dir`, its most recent training,
    that training's last kept round. `audit_log`: the site's (default `state_dir/audit.jsonl`).
    Raises ExportError with one line naming the key, site, training or round at fault.
    """
    try:
        key = load_site_context(key_file)
    except KeyFileError as err:
        raise ExportError(f"cannot export without this federation's site key: {err}") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: export into a new one")
    archive = RoundArchive(state_dir, site or _only_site(state_dir))
    training = _training(archive, training_id)
    try:
        kept = archive.load(training, server_round or archive.rounds(training)[-1])
    except ArchiveError as err:
        raise ExportError(str(err)) from None
    facts = _facts(kept, key)
    network = _model(kept, key)
    hashes = write_bundle(out, facts, network, model_card(facts, kept, archive.history(training)))
    AuditLog(audit_log or Path(state_dir) / "audit.jsonl").record_export(
        training, facts.server_round, out, hashes)
    return ExportedBundle(out, facts, hashes)


def write_bundle(out: Path, facts: BundleFacts, network: "torch.nn.Module",
                 card: str) -> dict[str, str]:
    """Write a bundle's files into folder `out`; return {file: sha256}. `card`: the model card."""
    hashes = {str(name): _write(out / name, data) for name, data in (
        (WEIGHTS, _weights(network)),
        (INFERENCE, _json(inference_config(facts))),
        (METADATA, _json(_metadata(facts))),
        (MODEL_CARD, card.encode()),
    )}
    assert set(hashes) == {str(f) for f in FILES}
    return hashes


def _only_site(state_dir: Path) -> str:
    folder = Path(state_dir) / RECEIVED_GLOBAL
    sites = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if len(sites) != 1:
        raise ExportError(f"{state_dir} holds exportable rounds of "
                          f"{'sites ' + ', '.join(sites) if sites else 'no site'}: "
                          + ("pass --site" if sites else "is it the site's state-dir, and has "
                             "the site evaluated an encrypted round?"))
    return sites[0]


def _training(archive: RoundArchive, training_id: str | None) -> str:
    trainings = archive.trainings()
    if not trainings:
        raise ExportError(f"site {archive.site} keeps no exportable round in {archive.folder}: "
                          "a site keeps the rounds it scores in encrypted trainings")
    if training_id is None:
        return trainings[-1]
    if training_id not in trainings:
        raise ExportError(f"site {archive.site} never took part in training {training_id}: it "
                          f"keeps rounds of training(s) {', '.join(trainings)}")
    return training_id


def _facts(kept: ArchivedRound, key: SiteKey) -> BundleFacts:
    from fedhealth.core.models import model_spec

    config = RunConfig.from_flower(kept.facts.run_config)
    limits = DataLimits(**kept.facts.limits)  # type: ignore[arg-type]
    task = model_spec(config.model).task
    steps = pipeline_steps(config.image_size, BUNDLE_READER, in_channels=config.in_channels)
    return BundleFacts(
        site=kept.facts.site, training_id=kept.facts.training_id,
        server_round=kept.facts.server_round, policy=config.policy, model=config.model,
        task=task, num_classes=limits.num_classes, image_size=config.image_size,
        in_channels=config.in_channels, batch_size=config.batch_size,
        max_image_mb=limits.max_image_mb,
        threshold=kept.facts.threshold, crypto_preset=key.preset.name,
        key_fingerprint=key.fingerprint,
        preprocessing=[str(step["_target_"]).rsplit(".", 1)[-1] for step in steps])


def _model(kept: ArchivedRound, key: SiteKey) -> "torch.nn.Module":
    """The scored model: the decrypted, checked global with the site's own tensors over it."""
    import torch

    from fedhealth.core.models import build_model

    facts = kept.facts
    instruction = kept.instruction()
    where = f"site {facts.site}, training {facts.training_id}, round {facts.server_round}"
    if instruction.key_fingerprint != key.fingerprint:
        raise ExportError(f"{where} was encrypted under key {instruction.key_fingerprint}, the "
                          f"key given is {key.fingerprint} (another federation's): use the "
                          "site.ctx of this federation")
    try:
        shared = instruction.global_tensors(key, kept.shared_layout())
    except (InstructionError, IntegrityError) as err:
        raise ExportError(f"{where}: the stored global is refused, not exported: {err}") from None
    config = RunConfig.from_flower(facts.run_config)
    network = build_model(config.model, num_classes=int(facts.limits["num_classes"]),  # type: ignore[call-overload]
                          image_size=config.image_size, in_channels=config.in_channels,
                          seed=config.seed)
    state = {**(shared or {}), **kept.site_tensors}
    names = list(network.state_dict())
    if missing := [n for n in names if n not in state]:
        raise ExportError(f"{where}: the stored tensors lack {missing[:3]}: the file does not "
                          "belong to this model; export another round")
    network.load_state_dict({n: torch.as_tensor(np.asarray(state[n])) for n in names})
    return network.eval()


def _metadata(facts: BundleFacts) -> dict[str, object]:
    """MONAI's metadata.json: versions, task and the network's input/output formats."""
    import monai
    import pydicom
    import torch

    size = [facts.image_size, facts.image_size]
    seg = facts.task == "segmentation"
    classes = {str(c): _class_name(c, facts.num_classes) for c in range(facts.num_classes)}
    rgb = facts.in_channels == 3
    channels = "three channels, RGB" if rgb else "one greyscale channel (colour as its luma)"
    channel_def = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "image"}
    version = importlib.metadata.version("fedhealth")
    return {
        "schema": MONAI_SCHEMA,
        "version": f"1.{facts.server_round}.0",
        "changelog": {f"1.{facts.server_round}.0": f"exported by fedhealth {version} from round "
                                                  f"{facts.server_round} of training "
                                                  f"{facts.training_id} at site {facts.site}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__,
        "numpy_version": np.__version__,
        "required_packages_version": {"fedhealth": version, "pydicom": pydicom.__version__},
        "name": f"fedhealth {facts.model} ({facts.policy}) of site {facts.site}",
        "task": f"{facts.task} of 2D DICOM images ({channels})",
        "description": f"A {facts.policy} federation's model as site {facts.site} scored it "
                       f"after round {facts.server_round}; see docs/README.md.",
        "authors": f"site {facts.site} of federated training {facts.training_id}",
        "copyright": f"site {facts.site}",
        "data_type": "dicom",
        "image_classes": f"{channels}, windowed to its 0.5-99.5 percentiles in [0, 1]",
        "label_classes": classes,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "DX/CR",
                                 "num_channels": facts.in_channels, "spatial_shape": size,
                                 "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": channel_def}},
            "outputs": {"pred": {"type": "probabilities",
                                 "format": "segmentation" if seg else "classes",
                                 "num_channels": facts.num_classes,
                                 "spatial_shape": size if seg else [facts.num_classes],
                                 "dtype": "float32", "value_range": [0, 1], "is_onehot": seg,
                                 "channel_def": classes}}},
        SECTION: asdict(facts),
    }


def _class_name(label: int, num_classes: int) -> str:
    return ("no finding", "finding")[label] if num_classes == 2 else f"class {label}"


def model_card(facts: BundleFacts, kept: ArchivedRound,
               history: dict[str, dict[str, object]]) -> str:
    """docs/README.md: what the model is, how well it did at its site by round, what the site
    contributed, and how to run it."""
    rounds = sorted(history, key=int)
    names = sorted({m for r in rounds for m in history[r]["metrics"]  # type: ignore[attr-defined]
                    if m != "num-examples"})
    table = ["| round | train images | " + " | ".join(names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for r in rounds:
        metrics: dict[str, float] = history[r]["metrics"]  # type: ignore[assignment]
        table.append(f"| {r} | {history[r]['train_examples']} | "
                     + " | ".join(f"{metrics[n]:.4f}" if n in metrics else "-" for n in names)
                     + " |")
    weight = float(kept.facts.instruction["site_weight"])  # type: ignore[arg-type]
    threshold = ("argmax of the class probabilities" if facts.threshold is None else
                 f"class 1 when P(class 1) >= {facts.threshold:.6g} (chosen on the site's "
                 "validation split for the best balanced accuracy)")
    return f"""# {facts.model} ({facts.policy}) of site {facts.site}

Exported by `fedhealth site export` from round {facts.server_round} of federated training
`{facts.training_id}` (CKKS preset `{facts.crypto_preset}`, key fingerprint
`{facts.key_fingerprint}`). It is the model exactly as the site scored it in that round:
the federation's global, decrypted at the site, with the site's own tensors
({_personal_words(facts.policy)}).

- Task: {facts.task}, {facts.num_classes} classes; input {_shape(facts)} float32 in [0, 1].
- Operating point: {threshold}.
- Preprocessing: exactly the site's steps (`sites.pipeline_config`, written into
  {INFERENCE} as MONAI transforms): DICOM rescale slope/intercept, window to the 0.5-99.5
  percentiles, invert MONOCHROME1, resize:
  {" > ".join(facts.preprocessing)}.

## The site's own metrics, on its test split, by round

{chr(10).join(table)}

## What the site contributed

It trained on its own images every round (train images above) and sent only E(a_k * shared
tensors); its weight in the last average was a_k = {weight:.4f}. Its images, labels and personal
tensors never left it.

## Running it

    fedhealth site predict --bundle THIS_FOLDER DICOM_FOLDER --out predictions.csv
    python -m monai.bundle run --config_file THIS_FOLDER/{INFERENCE} \\
        --bundle_root THIS_FOLDER --dataset_dir DICOM_FOLDER --output_dir OUT

Neither needs a key, Flower, TenSEAL or a federation. `site predict` needs the `fedhealth`
package. `monai.bundle run` needs only Python with torch, MONAI with its `fire` and
`ignite` extras (`pip install 'monai[fire,ignite]'`) and pydicom, plus the model zoo's one module,
`fedhealth.core.models` (torch and MONAI only; the `fedhealth` package installed, or
`fedhealth/__init__.py`, `fedhealth/core/__init__.py` and `fedhealth/core/models.py` on
PYTHONPATH); its config names no other fedhealth module. It reads DICOM with MONAI's plain
PydicomReader and takes every DICOM file under DICOM_FOLDER: the site's size limit
({facts.max_image_mb:g} MB) and the site check's refusals of unusable files are not applied.
{_run_output(facts)} `verify_net_in_out` checks the network
against {METADATA}.
"""


def _run_output(facts: BundleFacts) -> str:
    if facts.task == "segmentation":
        return ("`monai.bundle run` computes the masks; `site predict` writes them as DICOM SEG, "
                "one per image, referencing it.")
    return f"`monai.bundle run` writes `OUT/{PROBABILITIES_FILE}` (file, class probabilities)."


def _shape(facts: BundleFacts) -> str:
    return f"1 x {facts.image_size} x {facts.image_size}"


def _personal_words(policy: str) -> str:
    return {"fedbn": "its own normalisation layers, their statistics measured on its training "
                     "images", "ditto": "Ditto's personal model, which is what it deploys",
            "fedper": "its own classifier head", "fedrep": "its own classifier head"}.get(
        policy, "only BatchNorm's batch counters: every weight is the global's")


def _weights(network: "torch.nn.Module") -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return buffer.getvalue()


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _write(path: Path, data: bytes) -> str:
    write_atomically(path, data, mode=0o644)
    return hashlib.sha256(data).hexdigest()

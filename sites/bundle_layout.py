"""The files of a MONAI Bundle as fedhealth writes them, and the inference config they hold.

MONAI's convention (https://docs.monai.io/en/stable/mb_specification.html): `configs/`
(`metadata.json`, `inference.json`), `models/model.pt` (a state dict), `docs/README.md` (the
model card). `sites.bundle_export` writes them, `sites.bundle_predict` and `python -m
monai.bundle run` read them. The inference config names no `sites` module, so a department
runs it with MONAI, torch, pydicom and the model zoo (`fedhealth.core.models`) alone: the network
comes from the zoo (its one definition, which imports only torch and MONAI), the preprocessing
is the site pipeline's steps as written once in `sites.pipeline_config` (image-only: the
segmentation form only adds the training masks' steps), read by MONAI's PydicomReader, and
the data list is every DICOM file under `--dataset_dir`, in the order the site check scans.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from sites.pipeline_config import (
    BUNDLE_READER,
    DATALIST_IMPORTS,
    folder_datalist,
    pipeline_steps,
)

METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
WEIGHTS = Path("models/model.pt")
MODEL_CARD = Path("docs/README.md")
FILES = (METADATA, INFERENCE, WEIGHTS, MODEL_CARD)
SECTION = "fedhealth"  # metadata.json's section of fedhealth facts (`BundleFacts`)
PROBABILITIES_FILE = "predictions.csv"  # what `monai.bundle run` writes into its output_dir


class BundleError(ValueError):
    """A folder is not a bundle fedhealth can run, or lacks one of its files."""


@dataclass(frozen=True)
class BundleFacts:
    """What a bundle's model is and how it was made: the metadata's `fedhealth` section.

    threshold: the operating point on P(class 1) the site chose on its validation split (None:
    argmax); batch_size: the run's, so a prediction batches as the site's evaluation did.
    """

    site: str
    training_id: str
    server_round: int
    policy: str
    model: str
    task: str
    num_classes: int
    image_size: int
    in_channels: int
    batch_size: int
    max_image_mb: float
    threshold: float | None
    crypto_preset: str
    key_fingerprint: str
    preprocessing: list[str]

    @classmethod
    def read(cls, bundle: Path) -> "BundleFacts":
        """The facts of the bundle in folder `bundle`, or BundleError naming what is missing."""
        path = bundle / METADATA
        try:
            section = json.loads(path.read_text())[SECTION]
            return cls(**section)
        except FileNotFoundError:
            raise BundleError(f"{bundle} is not a MONAI Bundle: it has no {METADATA}; pass the "
                              "folder `fedhealth site export --out` wrote") from None
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{path} has no readable '{SECTION}' section ({err}): not a "
                              "bundle fedhealth exported") from None


def inference_config(facts: BundleFacts) -> dict[str, object]:
    """`configs/inference.json`: MONAI's standard inference layout (network_def, preprocessing,
    dataset, dataloader, evaluator with a CheckpointLoader and, for a classifier, a
    ClassificationSaver of the class probabilities)."""
    segmenting = facts.task == "segmentation"
    return {
        "imports": ["$import itertools", "$import torch", "$from monai.handlers import from_engine",
                    *DATALIST_IMPORTS],
        "bundle_root": ".",
        "dataset_dir": "studies",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "fedhealth.core.models.build_model", "name": facts.model,
                        "num_classes": facts.num_classes, "image_size": facts.image_size,
                        "in_channels": facts.in_channels},
        "network": "$@network_def.to(@device)",
        "datalist": folder_datalist("@dataset_dir"),
        "preprocessing": {"_target_": "Compose",
                          "transforms": pipeline_steps(facts.image_size, BUNDLE_READER,
                                                        in_channels=facts.in_channels)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset",
                       "batch_size": facts.batch_size, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            *([{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}] if segmenting else [])]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": f"$@bundle_root + '/{WEIGHTS}'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            *([] if segmenting else [{  # masks: `fedhealth site predict` writes them as DICOM SEG
                "_target_": "ClassificationSaver", "output_dir": "@output_dir",
                "filename": PROBABILITIES_FILE, "overwrite": True,
                # rows are named by file: the batch keeps only tensors, the data list's order does
                "batch_transform": "$lambda batch, n=itertools.count(), items=@datalist: "
                                   "[{'filename_or_obj': items[next(n)]['image']} "
                                   "for _ in batch]",
                "output_transform": "$from_engine(['pred'])"}]),
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }

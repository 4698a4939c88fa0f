"""`fedhealth site predict`: run an exported bundle on a folder of new studies.

Needs the bundle alone: no federation, no key, no labels. Files are found by the scan `fedhealth
site check` runs (every unusable one skipped with its reason), decoded and preprocessed by the
bundle's own inference config (the site pipeline, `sites.bundle_layout`), and scored in batches
of the run's size, so a study the site evaluated gets the very logits its evaluation computed.
One CSV row per series: its images' mean class probabilities (a radiograph series is usually
one image), the mean logits, and the class at the site's operating point.
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sites.bundle_layout import INFERENCE, WEIGHTS, BundleError, BundleFacts
from sites.data_limits import DataLimits

if TYPE_CHECKING:  # torch and MONAI load when a prediction runs, not with `fedhealth --help`
    import torch

    from sites.dicom_files import DicomImage, Skipped

SERIES_COLUMNS = ("patient_id", "study_uid", "series_uid", "images")


@dataclass(frozen=True)
class SeriesPrediction:
    """One series' scores; `probabilities` and `logits` are means over its images."""

    patient_id: str
    study_uid: str
    series_uid: str
    images: int
    probabilities: tuple[float, ...]
    logits: tuple[float, ...]
    predicted: int


@dataclass(frozen=True)
class Predictions:
    """Every series scored, and every file skipped with its reason."""

    series: list[SeriesPrediction]
    skipped: "list[Skipped]"


def study_items(folder: str | Path, limits: DataLimits) -> list[dict[str, object]]:
    """The data list of a folder, as the bundle's inference config and `predict` read it."""
    from sites.dicom_files import scan_tree

    return _items(scan_tree(Path(folder), max_image_bytes=limits.max_image_bytes).images)


def _items(images: "list[DicomImage]") -> list[dict[str, object]]:
    # `label` is what the site pipeline's last steps type and keep; -1: unknown
    return [{"image": str(i.path), "label": -1, "monochrome1": i.monochrome1} for i in images]


def predict(bundle: Path, studies: Path) -> Predictions:
    """Score every usable image under `studies` with the bundle in folder `bundle`."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, Dataset

    from sites.dicom_files import SiteDataError, scan_tree

    facts = BundleFacts.read(bundle)
    if facts.task != "classification":
        raise BundleError(f"{bundle} holds a {facts.task} model: `site predict` writes class "
                          "probabilities only (DICOM SEG output is not implemented yet)")
    if not studies.is_dir():
        raise SiteDataError(f"{studies} does not exist or is not a folder")
    parser = ConfigParser()
    parser.read_config(bundle / INFERENCE)
    network: torch.nn.Module = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / WEIGHTS, map_location="cpu", weights_only=True))
    network.eval()
    limits = DataLimits(facts.max_image_mb, facts.num_classes)
    scan = scan_tree(studies, max_image_bytes=limits.max_image_bytes)
    dataset = Dataset(_items(scan.images), transform=parser.get_parsed_content("preprocessing"))
    logits = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=facts.batch_size, num_workers=0):
            logits.append(network(batch["image"]))
    scores = torch.cat(logits) if logits else torch.zeros(0, facts.num_classes)
    return Predictions(_by_series(scan.images, scores, facts.threshold), list(scan.skipped))


def _by_series(images: "list[DicomImage]", logits: "torch.Tensor",
               threshold: float | None) -> list[SeriesPrediction]:
    groups: dict[tuple[str, str, str], list[int]] = {}
    for index, image in enumerate(images):
        key = (image.patient_id, image.study_uid, image.series_uid or image.sop_uid)
        groups.setdefault(key, []).append(index)
    rows = []
    for (patient, study, series), members in groups.items():
        mean_logits = logits[members].mean(dim=0)
        probabilities = logits[members].softmax(dim=1).mean(dim=0)
        if threshold is not None and len(probabilities) == 2:
            predicted = int(probabilities[1] >= threshold)
        else:
            predicted = int(probabilities.argmax())
        rows.append(SeriesPrediction(patient, study, series, len(members),
                                     tuple(float(p) for p in probabilities),
                                     tuple(float(x) for x in mean_logits), predicted))
    return rows


def write_csv(predictions: Predictions, out: Path, num_classes: int) -> Path:
    """`out` with one row per series (columns: SERIES_COLUMNS, probability_<c>, logit_<c>,
    predicted); floats as Python writes them, which read back to the same float32 values."""
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = range(num_classes)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*SERIES_COLUMNS, *(f"probability_{c}" for c in classes),
                         *(f"logit_{c}" for c in classes), "predicted"])
        for row in predictions.series:
            writer.writerow([row.patient_id, row.study_uid, row.series_uid, row.images,
                             *row.probabilities, *row.logits, row.predicted])
    return out


def predict_command(
    studies: Annotated[Path, typer.Argument(help="Folder of new DICOM studies (any layout).")],
    bundle: Annotated[Path, typer.Option(help="The bundle folder `fedhealth site export` wrote.")],
    out: Annotated[Path, typer.Option(help="CSV to write: one row per series.")] = Path(
        "predictions.csv"),
) -> None:
    """Run an exported bundle on new studies: class probabilities per series.

    Files it cannot use are skipped with a reason, as `site check` does. Needs the bundle only:
    no federation, no key."""
    from rich.console import Console

    from sites.dicom_files import SiteDataError

    console = Console(stderr=True)
    try:
        facts = BundleFacts.read(bundle)
        predictions = predict(bundle, studies)
    except (BundleError, SiteDataError) as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    write_csv(predictions, out, facts.num_classes)
    console.print(f"{len(predictions.series)} series scored by {facts.model} (site "
                  f"{facts.site}, round {facts.server_round}) -> {out}; "
                  f"{len(predictions.skipped)} files skipped")
    for skipped in predictions.skipped:
        console.print(f"  skipped {skipped.path}: {skipped.reason}", soft_wrap=True)

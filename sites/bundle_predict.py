"""`fedhealth site predict`: run an exported bundle on a folder of new studies.

Needs the bundle alone: no federation, no key, no labels. Files are found by the scan `fedhealth
site check` runs (every unusable one skipped with its reason), decoded and preprocessed by the
site pipeline itself (`sites.dataset.site_transforms`, with the bundle's size limit), scored by
the bundle's network in batches of the run's size, so a study the site evaluated gets the very
logits its evaluation computed. The bundle's inference config holds the same pipeline steps
(`sites.pipeline_config`) for `python -m monai.bundle run`, which gives the same probabilities.
One CSV row per series: its images' mean class probabilities (a radiograph series is usually
one image), the mean logits, and the class at the site's operating point. A segmentation bundle
writes a DICOM SEG per image (sites.seg_output) and its rows give the classes' pixel shares.
"""

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sites.bundle_layout import INFERENCE, WEIGHTS, BundleError, BundleFacts
from sites.data_limits import DataLimits
from sites.pipeline_config import datalist_item

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


def _items(images: "list[DicomImage]") -> list[dict[str, object]]:
    # `label` is what the site pipeline's last steps type and keep; -1: unknown
    return [datalist_item(str(i.path), -1, i.monochrome1, i.frame) for i in images]


def predict(bundle: Path, studies: Path, seg_dir: Path | None = None) -> Predictions:
    """Score every usable image under `studies` with the bundle in folder `bundle`.

    A segmentation bundle also writes one DICOM SEG per image into `seg_dir` (required then);
    its rows give each class's share of the predicted pixels, and `predicted` 1 when any pixel
    is foreground.
    """
    import torch
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, Dataset

    from sites.dataset import site_transforms
    from sites.dicom_files import SiteDataError, scan_tree
    from sites.seg_output import write_seg

    facts = BundleFacts.read(bundle)
    segmenting = facts.task == "segmentation"
    if segmenting and seg_dir is None:
        raise BundleError(f"{bundle} holds a segmentation model, which writes DICOM SEG "
                          "objects: give a folder for them (--seg-dir)")
    if not studies.is_dir():
        raise SiteDataError(f"{studies} does not exist or is not a folder")
    parser = ConfigParser()
    parser.read_config(bundle / INFERENCE)
    network: torch.nn.Module = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / WEIGHTS, map_location="cpu", weights_only=True))
    network.eval()
    limits = DataLimits(facts.max_image_mb, facts.num_classes)
    scan = scan_tree(studies, max_image_bytes=limits.max_image_bytes)
    dataset = Dataset(_items(scan.images), transform=site_transforms(facts.image_size,
                                                                     limits=limits,
                                                                     in_channels=facts.in_channels))
    logits: list[torch.Tensor] = []
    shares: list[torch.Tensor] = []  # segmentation: each class's share of an image's pixels
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=facts.batch_size, num_workers=0):
            output = network(batch["image"])
            if not segmenting:
                logits.append(output)
                continue
            for image_logits in output:
                image = scan.images[len(shares)]
                mask = _full_size_mask(image_logits, image)
                write_seg(image.path, mask.numpy(), seg_dir, facts)  # type: ignore[arg-type]
                logits.append(image_logits.mean(dim=(1, 2))[None])
                shares.append(torch.bincount(mask.ravel(), minlength=facts.num_classes)[None]
                              / mask.numel())
    scores = torch.cat(logits) if logits else torch.zeros(0, facts.num_classes)
    if segmenting:
        probabilities = torch.cat(shares) if shares else scores
        rows = _by_series(scan.images, scores, probabilities,
                          lambda p: int(p[1:].sum() > 0))
    else:
        rows = _by_series(scan.images, scores, scores.softmax(dim=1),
                          lambda p: _operating_class(p, facts.threshold))
    return Predictions(rows, list(scan.skipped))


def _full_size_mask(logits: "torch.Tensor", image: "DicomImage") -> "torch.Tensor":
    """The predicted classes at the source image's own Rows x Columns (nearest neighbour)."""
    import torch

    classes = logits.argmax(dim=0)[None, None].float()
    full = torch.nn.functional.interpolate(classes, size=(image.rows, image.columns),
                                           mode="nearest")
    return full[0, 0].long()


def _operating_class(probabilities: "torch.Tensor", threshold: float | None) -> int:
    """Class 1 at or above the site's threshold on P(class 1), else the most probable class."""
    if threshold is not None and len(probabilities) == 2:
        return int(probabilities[1] >= threshold)
    return int(probabilities.argmax())


def _by_series(images: "list[DicomImage]", logits: "torch.Tensor",
               probabilities: "torch.Tensor",
               decide: "Callable[[torch.Tensor], int]") -> list[SeriesPrediction]:
    """Per-image scores averaged per series; `decide` names a series' class from its mean."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for index, image in enumerate(images):
        key = (image.patient_id, image.study_uid, image.series_uid or image.sop_uid)
        groups.setdefault(key, []).append(index)
    rows = []
    for (patient, study, series), members in groups.items():
        mean = probabilities[members].mean(dim=0)
        rows.append(SeriesPrediction(patient, study, series, len(members),
                                     tuple(float(p) for p in mean),
                                     tuple(float(x) for x in logits[members].mean(dim=0)),
                                     decide(mean)))
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
    seg_dir: Annotated[Path | None, typer.Option(
        help="Segmentation bundles: folder for the DICOM SEG objects (default: beside --out, "
             "<out name>-seg).")] = None,
) -> None:
    """Run an exported bundle on new studies: class probabilities per series.

    Files it cannot use are skipped with a reason, as `site check` does. Needs the bundle only:
    no federation, no key."""
    from rich.console import Console

    from sites.dicom_files import SiteDataError

    console = Console(stderr=True)
    try:
        facts = BundleFacts.read(bundle)
        predictions = predict(bundle, studies, seg_dir or out.with_name(f"{out.stem}-seg"))
    except (BundleError, SiteDataError) as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    write_csv(predictions, out, facts.num_classes)
    console.print(f"{len(predictions.series)} series scored by {facts.model} (site "
                  f"{facts.site}, round {facts.server_round}) -> {out}; "
                  f"{len(predictions.skipped)} files skipped")
    for skipped in predictions.skipped:
        console.print(f"  skipped {skipped.path}: {skipped.reason}", soft_wrap=True)

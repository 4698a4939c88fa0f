"""`fedhealth site check`: what a site holds and every file (or labels row) it cannot use.

The JSON fields are a stable interface, documented in the README's "Site data" section.
"""

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sites.data_limits import DEFAULT_MAX_IMAGE_MB, DEFAULT_NUM_CLASSES, DataLimits

if TYPE_CHECKING:  # the pipeline imports torch and MONAI: only load it when a check runs
    from sites.dataset import SiteIndex


@dataclass(frozen=True)
class SiteReport:
    """One site's inventory. `images` counts usable 2D images: decodable and, when a labels file
    exists, labeled; the frames of an Enhanced multi-frame object that assembles into a volume
    are not images. `volumes` counts usable assembled volumes (series of positioned slices,
    Enhanced CT/MR objects; labeled, when a labels file exists), `series` the distinct
    SeriesInstanceUIDs among usable images and volumes, `segmentations` the DICOM SEG objects
    used as volume masks. `series_skipped` lists every series that is not a usable volume, why.
    `labels` is {split: {class: images}}, empty without a labels file."""

    site: str
    path: str
    labels_file: str | None
    files: int
    images: int
    patients: int
    studies: int
    modalities: dict[str, int]
    manufacturers: dict[str, int]
    labels: dict[str, dict[str, int]]
    skipped: list[dict[str, str]]
    series: int = 0
    volumes: int = 0
    segmentations: int = 0
    series_skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def check_site(data_dir: Path, labels: Path | None = None, seed: int = 0,
               on_file: Callable[[], None] | None = None, *,
               limits: DataLimits = DataLimits(), remember: Path | None = None) -> SiteReport:
    """Inventory `data_dir`; raises SiteDataError only for a missing/empty folder or bad labels file.

    `seed` is the patient split's, as in `load_site`, so the per-split counts are the training ones;
    `limits` are the site's (its settings), which training applies too. `remember`: keep the
    inspections there (`sites.dataset.scan_record`), so training does not decode the files again.
    """
    from sites.dataset import index_site

    index = index_site(data_dir, labels=labels, seed=seed, require_labels=False, on_file=on_file,
                       limits=limits, remember=remember)
    return _report(data_dir, index)


def _report(data_dir: Path, index: "SiteIndex") -> SiteReport:
    from sites.dataset import class_counts

    in_volumes = {f for x in index.volumes if x.volume.enhanced for f in x.volume.files}
    images = [x.image for x in index.images if str(x.image.path) not in in_volumes]
    volumes = [x.volume for x in index.volumes]
    return SiteReport(
        site=index.name, path=str(data_dir),
        labels_file=str(index.labels_file) if index.labels_file else None,
        files=index.files, images=len(images),
        patients=len({i.patient_id for i in images} | {v.patient_id for v in volumes}),
        studies=len({i.study_uid for i in images} | {v.study_uid for v in volumes}),
        modalities=dict(Counter(i.modality for i in images).most_common()),
        manufacturers=dict(Counter(i.manufacturer for i in images).most_common()),
        labels=class_counts(index) if index.labels_file else {},
        skipped=[asdict(s) for s in index.skipped],
        series=len({i.series_uid for i in images} | {v.series_uid for v in volumes}),
        volumes=len(volumes),
        segmentations=len({str(x.mask) for x in index.volumes
                           if x.mask is not None and x.mask.suffix != ".npy"}),
        series_skipped=[asdict(s) for s in index.series_skipped],
    )


def summary_table(reports: Sequence[SiteReport]) -> Table:
    """One row per site: the numbers a coordinator compares across hospitals."""
    table = Table(title="site check")
    for column in ("site", "images", "volumes", "patients", "studies", "train", "val", "test"):
        table.add_column(column, justify="left" if column == "site" else "right",
                         no_wrap=column == "site")
    table.add_column("vendor")
    table.add_column("skipped", justify="right")
    for r in reports:
        per_class = [" ".join(f"{c}:{n}" for c, n in r.labels[s].items()) or "-"
                     for s in ("train", "val", "test")] if r.labels else ["no labels"] + [""] * 2
        table.add_row(r.site, str(r.images), str(r.volumes), str(r.patients), str(r.studies),
                      *per_class,
                      f"{_counts(r.modalities)}; {_counts(r.manufacturers)}", str(len(r.skipped)))
    return table


def skipped_table(report: SiteReport, series: bool = False) -> Table:
    """The skipped files, or (`series`) the series that are not a usable volume."""
    entries = report.series_skipped if series else report.skipped
    table = Table(title=f"{report.site}: {len(entries)} series not usable as volumes" if series
                  else f"{report.site}: {len(entries)} skipped of {report.files} files")
    table.add_column("path", overflow="fold")
    table.add_column("reason", overflow="fold")
    for s in entries:
        table.add_row(_relative(s["path"], report.path), s["reason"])
    return table


def check_command(
    data_dir: Annotated[Path, typer.Argument(help="The site's folder of DICOM files (any layout).")],
    labels: Annotated[Path | None, typer.Option(
        help="Labels CSV (StudyInstanceUID or SOPInstanceUID, label). Default: DIR/labels.csv.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the train/val/test patient split.")] = 0,
    max_image_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest image decoded, as its header declares it (rows x columns x frames "
                        "x samples x bytes), in MB; larger ones are skipped. As the site setting "
                        "max-image-mb.")] = DEFAULT_MAX_IMAGE_MB,
    num_classes: Annotated[int, typer.Option(
        min=2, help="Labels must be integers 0 to num-classes - 1. As the site setting "
                    "num-classes.")] = DEFAULT_NUM_CLASSES,
) -> None:
    """Report what a site holds and every file it cannot use (skipped with a reason, never fatal)."""
    from sites.dicom_files import SiteDataError, list_site

    console = Console(stderr=as_json)
    try:
        total = len(list_site(data_dir).files) if data_dir.is_dir() else 0
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"checking {data_dir}", total=total)
            report = check_site(data_dir, labels, seed, on_file=lambda: bar.advance(task),
                                limits=DataLimits(max_image_mb, num_classes))
    except SiteDataError as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    console.print(summary_table([report]))
    if report.skipped:
        console.print(skipped_table(report))
    if report.series_skipped:
        console.print(skipped_table(report, series=True))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({n})" for k, n in counts.items()) or "-"


def _relative(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path

"""`fedhealth synth`: write a synthetic federation from the command line.

The generator (numpy, pydicom) loads only when the command runs, so `fedhealth --help` stays instant.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table


def synth(
    out: Annotated[Path, typer.Option(help="Folder to write hospital-<k>/ folders into.")],
    scenario: Annotated[str, typer.Option(
        help="Named non-IID design (iid, feature-shift, label-shift, concept-shift, mixed): sets "
             "the sites, their sizes, vendors, prevalence and labelling; the flags below "
             "override it.")] = "mixed",
    sites: Annotated[int | None, typer.Option(min=1, help="Number of hospitals.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
    images_per_site: Annotated[str | None, typer.Option(
        help="One count for all sites, or a comma list per site (size skew), e.g. 60,40,20.")] = None,
    image_size: Annotated[int, typer.Option(min=64, max=256, help="Image rows = columns.")] = 64,
    label_skew: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="0: 50% prevalence everywhere; 1: from 5% to 95% across sites.")] = None,
    scanner_shift: Annotated[float | None, typer.Option(
        min=0.0, help="0: one vendor everywhere; 1: a different vendor per site.")] = None,
    segmentation_masks: Annotated[bool, typer.Option(
        help="Also write masks/<SOPInstanceUID>.npy and a mask column in labels.csv.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace hospital folders that already exist in --out.")] = False,
) -> None:
    """Write one folder of DICOM studies and a labels.csv per hospital."""
    from fedhealth.core.synth.federation import synthesize
    from fedhealth.core.synth.scenarios import get_scenario

    per_site: int | tuple[int, ...] | None = None
    if images_per_site is not None:
        try:
            counts = tuple(int(c) for c in images_per_site.split(","))
        except ValueError:
            raise typer.BadParameter(f"not a count or comma list of counts: {images_per_site!r}",
                                     param_hint="--images-per-site") from None
        per_site = counts[0] if len(counts) == 1 else counts
    try:
        design = get_scenario(scenario).resized(sites, per_site)
        if label_skew is not None:
            design = design.with_label_skew(label_skew)
        if scanner_shift is not None:
            design = design.with_scanner_shift(scanner_shift)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    with Progress(transient=True) as bar:
        task = bar.add_task("synthesizing", total=sum(site.images for site in design.sites))
        try:
            summaries = synthesize(out, design, seed, image_size=image_size,
                                   segmentation_masks=segmentation_masks, overwrite=overwrite,
                                   progress=lambda n: bar.advance(task, n))
        except (ValueError, FileExistsError) as err:
            raise typer.BadParameter(str(err)) from None
    table = Table(title=f"synthetic federation in {out}: scenario {design.name}")
    for column in ("site", "images", "patients", "studies", "label 0", "label 1", "vendor"):
        table.add_column(column)
    for s in summaries:
        table.add_row(s.name, str(s.images), str(s.patients), str(s.studies), str(s.labels[0]),
                      str(s.labels[1]), f"{s.manufacturer} {s.model} ({s.photometric})")
    Console().print(table)

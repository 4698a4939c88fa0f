"""`fedhealth synth`: write a synthetic federation from the command line.

`--modality XR` (the default) writes chest radiographs (DX/CR) under a named non-IID scenario;
`--modality CT` writes chest CT series per hospital (fedhealth.core.synth.ct_federation), for 3D
models. The generator (numpy, pydicom) loads only when the command runs, so `fedhealth --help`
stays instant.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

MODALITIES = ("XR", "CT")


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
    image_size: Annotated[int | None, typer.Option(
        min=16, max=256, help="Image rows = columns. Default: 64 (XR, 64-256), 32 (CT, 16-256).")
    ] = None,
    label_skew: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="0: 50% prevalence everywhere; 1: from 5% to 95% across sites.")] = None,
    scanner_shift: Annotated[float | None, typer.Option(
        min=0.0, help="0: one vendor everywhere; 1: a different vendor per site.")] = None,
    segmentation_masks: Annotated[bool, typer.Option(
        help="Also write masks/<SOPInstanceUID>.npy (CT: masks/<SeriesInstanceUID>.npy volumes) "
             "and a mask column in labels.csv.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace hospital folders that already exist in --out.")] = False,
    modality: Annotated[str, typer.Option(
        help="XR: chest radiographs (DX/CR); CT: chest CT series (one file per slice, some "
             "Enhanced multi-frame), for 3D models.")] = "XR",
    series_per_site: Annotated[int, typer.Option(
        min=1, help="CT: series (one study each) per hospital.")] = 12,
    seg_masks: Annotated[bool, typer.Option(
        help="CT: also write each series' lesion as a DICOM SEG object next to it.")] = False,
) -> None:
    """Write one folder of DICOM studies and a labels.csv per hospital."""
    from fedhealth.core.synth.federation import synthesize
    from fedhealth.core.synth.scenarios import get_scenario

    if modality not in MODALITIES:
        raise typer.BadParameter(f"{modality!r}: choose one of {', '.join(MODALITIES)}",
                                 param_hint="--modality")
    if modality == "CT":
        _synth_ct(out, sites or 3, seed, series_per_site, image_size or 32, segmentation_masks,
                  seg_masks, overwrite)
        return
    image_size = image_size or 64

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


def _synth_ct(out: Path, sites: int, seed: int, series: int, image_size: int, npy_masks: bool,
              seg_masks: bool, overwrite: bool) -> None:
    """`--modality CT`: the CT federation, and a table of what each hospital holds."""
    from fedhealth.core.synth.ct_federation import synthesize_ct

    try:
        summaries = synthesize_ct(out, sites, seed, series_per_site=series, image_size=image_size,
                                  npy_masks=npy_masks, seg_masks=seg_masks, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        raise typer.BadParameter(str(err)) from None
    table = Table(title=f"synthetic CT federation in {out}")
    for column in ("site", "series", "enhanced", "slices", "patients", "label 0", "label 1",
                   "SEG", "vendor"):
        table.add_column(column)
    for s in summaries:
        table.add_row(s.name, str(s.series), str(s.enhanced), str(s.slices), str(s.patients),
                      str(s.labels[0]), str(s.labels[1]), str(s.segmentations),
                      f"{s.manufacturer} {s.model} ({s.patient_position})")
    Console().print(table)

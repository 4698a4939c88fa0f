"""`fedhealth demo`: the README's main job, end to end on synthetic hospitals.

Two contrasting scenarios, so the winner of each is visible: `feature-shift` (a different scanner
per hospital, the case FedBN targets) and `concept-shift` (one hospital calls dense, calcified
nodules benign that the others call findings, the case personal heads and Ditto target). For
each: synthesize the hospitals, check each site's data, run encrypted federations against the
local and pooled baselines, print the table with 95% intervals and write results JSON and a plot.
It ends as a hospital's project does: one site exports its model of the last run as a MONAI
Bundle and runs it on a handful of new studies. Sized to finish in under ten minutes on two CPU cores.
"""

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedhealth.app.compare import KEY_FOLDER, STATE_FOLDER, compare, runs_folder
from fedhealth.app.report import plot_results, results_table
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.synth.federation import synthesize
from fedhealth.core.synth.scenarios import Scenario, get_scenario
from sites.bundle_export import export_bundle
from sites.bundle_predict import predict, write_csv
from sites.dataset import scan_record, site_cache_dir
from sites.site_check import check_site, summary_table
from sites.site_settings import simulated_site_dirs


@dataclass(frozen=True)
class DemoPart:
    """One scenario of the demo and the strategies that tell its story, at a size that fits the
    demo's ten minutes: as many training images a site as the benchmark's scenario (what decides
    who wins), a smaller test split (which only narrows the intervals)."""

    scenario: str
    images_per_site: int
    strategies: tuple[str, ...]
    split_shares: tuple[float, float, float] | None = None  # None: the scenario's

    def design(self) -> Scenario:
        scenario = get_scenario(self.scenario).resized(images_per_site=self.images_per_site)
        return replace(scenario, split_shares=self.split_shares or scenario.split_shares)


DEMO_PARTS = (
    DemoPart("feature-shift", 800, ("local", "pooled", "fedavg", "fedbn")),
    DemoPart("concept-shift", 800, ("local", "pooled", "fedavg", "ditto"),
             split_shares=(0.1, 0.1, 0.8)),
)
DEMO_CONFIG = RunConfig()  # the run-config defaults: the demo shows what a user gets
NEW_STUDIES = 6  # per hospital, synthesized after training for the exported model to score


def run_demo(out: Path, seed: int, console: Console) -> list[Path]:
    """Run every part of the demo into `out/<scenario>/`; return the results JSON paths."""
    results = [_run_part(part, out / part.scenario, seed, console) for part in DEMO_PARTS]
    _take_home(DEMO_PARTS[-1], out / DEMO_PARTS[-1].scenario, seed, console)
    return results


def _take_home(part: DemoPart, out: Path, seed: int, console: Console) -> Path:
    """The first hospital exports its model of the part's last run (its most recent training)
    and scores new studies from its own scanner with it; returns the predictions CSV."""
    work = runs_folder(out / wire.RESULTS_FILE)
    site = simulated_site_dirs(out / "hospitals")[0].name
    console.rule(f"{site} takes its model home")
    bundle_dir = out / f"bundle-{site}"
    shutil.rmtree(bundle_dir, ignore_errors=True)  # our scratch: a re-run exports afresh
    bundle = export_bundle(work / STATE_FOLDER / site, work / KEY_FOLDER / wire.SITE_KEY_FILE,
                           bundle_dir)
    console.print(f"$ fedhealth site export --state-dir {work / STATE_FOLDER / site} "
                  f"--key-file {work / KEY_FOLDER / wire.SITE_KEY_FILE} --out {bundle_dir}\n"
                  f"  {bundle.facts.model} ({bundle.facts.policy}), round "
                  f"{bundle.facts.server_round}: a MONAI Bundle in {bundle_dir}")
    new = out / "new-studies"
    synthesize(new, get_scenario(part.scenario).resized(images_per_site=NEW_STUDIES), seed + 1,
               image_size=DEMO_CONFIG.image_size, overwrite=True)
    predictions = predict(bundle.path, new / site)
    csv_path = write_csv(predictions, out / "predictions.csv", bundle.facts.num_classes)
    console.print(f"$ fedhealth site predict --bundle {bundle_dir} {new / site} --out {csv_path}")
    skipped = ", ".join(Path(s.path).name for s in predictions.skipped) or "none"
    table = Table(title=f"{site}: {len(predictions.series)} new studies (skipped: {skipped})")
    for column in ("study", "P(finding)", "predicted"):
        table.add_column(column, justify="left" if column == "study" else "right")
    for row in predictions.series:
        table.add_row(f"...{row.study_uid[-12:]}", f"{row.probabilities[-1]:.3f}",
                      str(row.predicted))
    console.print(table)
    return csv_path


def _run_part(part: DemoPart, out: Path, seed: int, console: Console) -> Path:
    scenario = part.design()
    console.rule(f"scenario {scenario.name}: {scenario.summary}")
    data = out / "hospitals"
    total = sum(site.images for site in scenario.sites)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"synthesizing {scenario.name} hospitals", total=total)
        synthesize(data, scenario, seed, image_size=DEMO_CONFIG.image_size, overwrite=True,
                   progress=lambda n: progress.advance(task, n))
    results_path = out / wire.RESULTS_FILE
    state = runs_folder(results_path) / STATE_FOLDER  # where compare's sites keep their caches
    # the check's inspections are the ones the sites' training would repeat: kept where they look
    reports = [check_site(site, remember=scan_record(site_cache_dir(state / site.name), site))
               for site in simulated_site_dirs(data)]
    console.print(summary_table(reports))

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("running strategies", total=len(part.strategies))

        started: list[str] = []

        def advance(label: str) -> None:
            progress.update(task, description=f"running {label}", completed=len(started))
            started.append(label)

        results = compare(data, results_path, part.strategies, replace(DEMO_CONFIG, seed=seed),
                          on_run=advance)
    runs = results.runs
    title = f"{scenario.name}: balanced accuracy on each site's own test split"
    console.print(results_table(runs, title=title))
    plot = plot_results(runs, out / "results.png", title=scenario.name)
    console.print(f"results: {results_path}\nplot:    {plot}")
    return results_path

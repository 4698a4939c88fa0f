"""`fedhealth demo`: the README's main job, end to end on synthetic hospitals.

Two contrasting scenarios, so the winner of each is visible: `feature-shift` (a different scanner
per hospital, the case FedBN targets) and `concept-shift` (each hospital labels nodules by its own
size threshold, the case personal heads and Ditto target). For each: synthesize the hospitals,
check each site's data, run encrypted federations against the local and pooled baselines, print
the table with 95% intervals and write results JSON and a plot. Sized to finish in under ten
minutes on two CPU cores.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from fedhealth.app.compare import compare
from fedhealth.app.report import plot_results, results_table
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.synth.federation import synthesize
from fedhealth.core.synth.scenarios import get_scenario
from sites.site_check import check_site, summary_table


@dataclass(frozen=True)
class DemoPart:
    """One scenario of the demo and the strategies that tell its story."""

    scenario: str
    images_per_site: int
    strategies: tuple[str, ...]


DEMO_PARTS = (
    DemoPart("feature-shift", 500, ("local", "pooled", "fedavg", "fedbn")),
    DemoPart("concept-shift", 500, ("local", "pooled", "fedavg", "fedper", "ditto")),
)
DEMO_CONFIG = RunConfig()  # the run-config defaults: the demo shows what a user gets


def run_demo(out: Path, seed: int, console: Console) -> list[Path]:
    """Run every part of the demo into `out/<scenario>/`; return the results JSON paths."""
    return [_run_part(part, out / part.scenario, seed, console) for part in DEMO_PARTS]


def _run_part(part: DemoPart, out: Path, seed: int, console: Console) -> Path:
    scenario = get_scenario(part.scenario).resized(images_per_site=part.images_per_site)
    console.rule(f"scenario {scenario.name}: {scenario.summary}")
    data = out / "hospitals"
    total = sum(site.images for site in scenario.sites)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"synthesizing {scenario.name} hospitals", total=total)
        synthesize(data, scenario, seed, image_size=DEMO_CONFIG.image_size, overwrite=True,
                   progress=lambda n: progress.advance(task, n))
    reports = [check_site(site) for site in sorted(p for p in data.iterdir() if p.is_dir())]
    console.print(summary_table(reports))

    results_path = out / wire.RESULTS_FILE
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

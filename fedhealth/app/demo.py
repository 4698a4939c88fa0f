"""`fedhealth demo`: the README's main job, end to end on synthetic hospitals.

Synthesizes three hospitals with label and scanner shift, checks each site's data, runs encrypted
personalized federations against the local and pooled baselines, prints the per-site table and
writes results JSON and a plot. Sized to finish in a few minutes on two CPU cores.
"""

from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from fedhealth.app.compare import compare
from fedhealth.app.report import plot_results, results_table
from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.synth import synthesize_federation
from sites.site_check import check_site, summary_table

DEMO_SITES = 3
DEMO_IMAGES_PER_SITE = (180, 150, 120)
DEMO_STRATEGIES = ("local", "pooled", "fedavg", "fedprox", "fedbn", "fedper")
DEMO_CONFIG = RunConfig(num_server_rounds=10, local_epochs=2, learning_rate=0.003, model="tiny",
                        image_size=64)


def run_demo(out: Path, seed: int, console: Console) -> Path:
    """Run the demo into `out`; return the path of the results JSON."""
    data = out / "hospitals"
    total = sum(DEMO_IMAGES_PER_SITE)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("synthesizing DICOM hospitals", total=total)
        synthesize_federation(data, DEMO_SITES, seed, images_per_site=DEMO_IMAGES_PER_SITE,
                              image_size=DEMO_CONFIG.image_size, overwrite=True,
                              progress=lambda n: progress.advance(task, n))
    reports = [check_site(site) for site in sorted(p for p in data.iterdir() if p.is_dir())]
    console.print(summary_table(reports))

    results_path = out / wire.RESULTS_FILE
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("running strategies", total=len(DEMO_STRATEGIES))

        started: list[str] = []

        def advance(label: str) -> None:
            progress.update(task, description=f"running {label}", completed=len(started))
            started.append(label)

        results = compare(data, results_path, DEMO_STRATEGIES, replace(DEMO_CONFIG, seed=seed),
                          on_run=advance)
    runs = results["runs"]
    console.print(results_table(runs))  # type: ignore[arg-type]
    plot = plot_results(runs, out / "results.png")  # type: ignore[arg-type]
    console.print(f"results: {results_path}\nplot:    {plot}")
    return results_path

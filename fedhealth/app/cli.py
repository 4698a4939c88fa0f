"""The `fedhealth` command line: one root app, one sub-app per party.

Each command lives next to the code it drives; this module only wires them together. Command
modules import torch, MONAI, TenSEAL and Flower inside their functions, never at the top, so
`fedhealth --help` (and every `--help`) answers without loading them (tests/test_cli_startup.py).
"""

from pathlib import Path

import typer

from fedhealth.app.console import report_console
from fedhealth.app.deployment import commands as deployment
from fedhealth.app.export_command import export_command
from fedhealth.app.keys_command import keys_init
from fedhealth.app.synth_command import synth
from sites.bundle_predict import predict_command
from sites.pull import pull_command
from sites.site_check import check_command

app = typer.Typer(help="Encrypted, personalized federated learning for medical imaging.",
                  no_args_is_help=True, add_completion=False)
site_app = typer.Typer(help="Hospital side: check data, run a site.", no_args_is_help=True)
keys_app = typer.Typer(help="CKKS key files.", no_args_is_help=True)
federation_app = typer.Typer(help="Coordinator side: bundles, SuperLink, runs.",
                             no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(keys_app, name="keys")
app.add_typer(federation_app, name="federation")

app.command()(synth)
site_app.command(name="check")(check_command)
site_app.command("start")(deployment.site_start)
site_app.command("approve")(deployment.site_approve)
site_app.command("export")(export_command)
site_app.command("predict")(predict_command)
site_app.command("pull")(pull_command)
keys_app.command("init")(keys_init)
federation_app.command("init")(deployment.federation_init)
federation_app.command("start")(deployment.federation_start)
federation_app.command("run")(deployment.federation_run)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="Folder for data, results and plot."),
         seed: int = typer.Option(7, help="Seed for data and training.")) -> None:
    """Synthesize 3 hospitals and compare encrypted personalized federations on them."""
    from fedhealth.app.demo import run_demo

    run_demo(out, seed, report_console())


@app.command(name="simulate")
def simulate_command(
    run_config: list[str] | None = typer.Option(
        None, "--run-config", help="Overrides of \\[tool.flwr.app.config], as for `flwr run`, e.g. "
        "\"data-dir='fed' key-dir='keys' out-dir='out' policy='fedbn'\"."),
    quiet: bool = typer.Option(False, help="Show only the run log's warnings and errors."),
) -> None:
    """Run the federation in Flower's simulation engine on a SuperLink of its own, stopped with
    everything it started when the run ends (`flwr run .` leaves its SuperLink running)."""
    from fedhealth.app.flower_cli import FlowerError, default_app_dir, submitted_run_config
    from fedhealth.app.report import results_table
    from fedhealth.app.simulation import SimulationError, simulate
    from fedhealth.core.config import ConfigError

    console = report_console()
    try:
        results = simulate(submitted_run_config(default_app_dir(), run_config or []),
                           verbose=not quiet)
    except (ConfigError, FlowerError, SimulationError) as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(results_table([results]))


@app.command(name="compare")
def compare_command(
    data: Path = typer.Option(..., exists=True, file_okay=False, help="Federation folder."),
    out: Path = typer.Option(..., help="Results JSON to write."),
    rounds: int | None = typer.Option(None, help="Federated rounds (baselines train as many "
                                      "epochs); default: the run config's."),
    seed: int = typer.Option(0, help="First seed (patient split, initial model, shuffles)."),
    repeats: int = typer.Option(1, min=1, help="Seeds per strategy: seed .. seed+repeats-1."),
    strategies: str = typer.Option(",".join(
        ("local", "pooled", "fedavg", "fedprox", "fedbn", "fedper", "fedrep", "ditto"))),
    plaintext_too: bool = typer.Option(False, help="Also run each strategy unencrypted."),
    dp: str | None = typer.Option(None, "--dp", help="Client-level DP noise multipliers, e.g. "
                                  "0,0.5,1: each federated strategy runs encrypted at each, with "
                                  "uniform weights (0: without noise); adds epsilon and a "
                                  "privacy/utility plot."),
    dp_clip_norm: float | None = typer.Option(None, help="L2 clipping norm of every site's "
                                              "update under --dp; default: the run config's."),
    model: str | None = typer.Option(None, help="Model zoo name; default: the run config's."),
    local_epochs: int | None = typer.Option(None, help="Default: the run config's."),
    learning_rate: float | None = typer.Option(None, help="Default: the run config's."),
    optimizer: str | None = typer.Option(None, help="adam or sgd; default: the run config's."),
    image_size: int | None = typer.Option(None, help="Default: the run config's."),
    balanced_loss: bool = typer.Option(False, help="Weight classes equally in every site's loss."),
    target_fraction: float = typer.Option(0.9, min=0.0, max=1.0, help="rounds_to_target: first "
                                          "round reaching this fraction of pooled's mean."),
) -> None:
    """Run a grid of strategies on one federation and write results JSON, a table and a plot.

    Every schedule option left out takes the run config's default (\\[tool.flwr.app.config]).
    """
    from fedhealth.app.compare import compare, parse_noise_levels, parse_strategies
    from fedhealth.app.report import plot_privacy, plot_results, results_table
    from fedhealth.core.config import ConfigError, RunConfig

    try:
        names = parse_strategies(strategies)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--strategies") from error
    try:
        dp_levels = parse_noise_levels(dp) if dp is not None else None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--dp") from error
    console = report_console()
    overrides = {"num-server-rounds": rounds, "model": model, "local-epochs": local_epochs,
                 "learning-rate": learning_rate, "optimizer": optimizer, "image-size": image_size,
                 "dp-clip-norm": dp_clip_norm}
    try:  # through Flower's field names: one path that checks every value, typed as it arrives
        config = RunConfig.from_flower({
            **RunConfig(seed=seed, balanced_loss=balanced_loss).to_flower(),
            **{key: value for key, value in overrides.items() if value is not None}})
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from error
    results = compare(data, out, names, config, repeats=repeats,
                      plaintext_seeds=repeats if plaintext_too else 0,
                      dp_levels=dp_levels, target_fraction=target_fraction,
                      on_run=lambda label: console.log(f"running {label}"))
    console.print(results_table(results.runs))
    console.print(f"plot: {plot_results(results.runs, out.with_suffix('.png'))}")
    if dp_levels:
        privacy_plot = out.with_name(f"{out.stem}-privacy.png")
        console.print(f"privacy plot: {plot_privacy(results.runs, privacy_plot)}")

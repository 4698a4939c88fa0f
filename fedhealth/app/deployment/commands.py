"""The deployment commands: `federation init|start|run` and `site start|approve`.

Each one checks everything it can before starting a long-lived process and exits with a
message that names the file and the fix; a running process is stopped with its children.
The modules they drive (certificates, Flower's CLI, the site check's MONAI pipeline) load only
when a command runs, so `fedhealth --help` stays instant.
"""

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedhealth.core.crypto import wire

console = Console(stderr=True)
_SITE_HINT = ("'Failed to activate SuperNode' above means the coordinator has not registered this "
              "site's node.pub; 'CERTIFICATE_VERIFY_FAILED' means ca.pem is not the CA that "
              "issued the SuperLink's certificate; a connection error means the SuperLink is "
              "not reachable at [superlink] address.")
_NOTEWORTHY = ("failure", "error", "unavailable", "excluded", "warning", "results written")


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _supervise(commands: dict[str, list[str]], env: dict[str, str],
               after_start: Callable[[subprocess.Popen], None] | None = None,
               hint: str = "") -> None:
    """Run `commands` (name -> command line) together in the foreground until one exits, then
    stop the others; SIGINT/SIGTERM stop them all (and their children) cleanly. `after_start`
    gets the first one's process."""
    processes = {name: subprocess.Popen(command, env=env) for name, command in commands.items()}

    def stop_all() -> None:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_all())
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop_all())
    try:
        if after_start is not None:
            after_start(next(iter(processes.values())))
        while not (exited := {name: p.returncode for name, p in processes.items()
                              if p.poll() is not None}):
            time.sleep(0.2)
    finally:
        stop_all()
        for process in processes.values():
            process.wait(timeout=30)
    name, code = next(iter(exited.items()))
    if code not in (0, -signal.SIGTERM):
        raise _fail(f"{name} exited with code {code}. {hint}".strip(), code=1)


def federation_init(
    name: Annotated[str, typer.Option(help="Federation name (goes into the CA's subject).")],
    sites: Annotated[str, typer.Option(help="Comma-separated site names, e.g. a,b,c.")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT sites will reach the SuperLink at; "
                                                "HOST goes into the certificate's SAN.")],
    out: Annotated[Path, typer.Option(help="New folder for the CA, coordinator and site "
                                           "bundles (keep it out of the app folder).")],
    preset: Annotated[str, typer.Option(help="CKKS preset for the federation key.")] = "default",
) -> None:
    """Write one bundle per site and one for the coordinator (certificates, keys, site.toml)."""
    from fedhealth.app.deployment.bundles import BundleError, init_federation, parse_sites

    try:
        bundle = init_federation(name, parse_sites(sites), superlink, out, preset)
    except (BundleError, ValueError) as err:
        raise _fail(str(err)) from None
    console.print(f"federation [bold]{name}[/bold]: key fingerprint {bundle.fingerprint}")
    console.print(f"  coordinator: {bundle.root}  (run `fedhealth federation start --dir "
                  f"{bundle.root}`)")
    for site in bundle.sites:
        console.print(f"  site {site}: {out / site}  (give this folder to the site; it holds "
                      "its secret keys)")
    console.print(f"  CA key: {out / 'ca'}  (keep offline; needed only to re-issue certificates)")


def federation_start(
    dir: Annotated[Path, typer.Option("--dir", help="The coordinator folder.")],
    bind: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "0.0.0.0",
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for the SuperLink.")] = 60,
) -> None:
    """Run the SuperLink with TLS and SuperNode authentication, the sites' keys registered."""
    from fedhealth.app.deployment import launch, pki
    from fedhealth.app.deployment.bundles import BundleError, CoordinatorBundle
    from fedhealth.app.flower_cli import FlowerError

    try:
        bundle = CoordinatorBundle.load(dir)
        pki.check_private_file(bundle.server_key, "SuperLink private key")
        pki.check_server_cert(bundle.server_cert, pki.load_ca_cert(bundle.ca_cert))
    except (BundleError, pki.PkiError) as err:
        raise _fail(str(err)) from None

    def register(process: subprocess.Popen) -> None:
        try:
            launch.wait_until_ready(bundle.superlink, bundle.ca_cert, ready_timeout, process)
            registered = launch.register_sites(bundle)
        except FlowerError as err:
            raise _fail(str(err), code=1) from None
        for site, node in registered.items():
            console.print(f"site {site}: {node}")
        console.print(f"[green]SuperLink ready[/green] at {bundle.superlink} "
                      f"(sites: {', '.join(bundle.sites)})")

    _supervise({"flower-superlink": launch.superlink_command(bundle, bind)},
               launch.coordinator_env(bundle), register)


def federation_run(
    dir: Annotated[Path, typer.Option("--dir", help="The coordinator folder.")],
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", help="Overrides, e.g. 'num-server-rounds=2 min-sites=2'.")] = None,
    app: Annotated[Path | None, typer.Option(
        help="Flower App folder (default: fedhealth's).")] = None,
) -> None:
    """Submit the app to the SuperLink (`flwr run`) and follow its rounds to the end."""
    from fedhealth.app.deployment import launch
    from fedhealth.app.deployment.bundles import BundleError, CoordinatorBundle
    from fedhealth.app.flower_cli import COMPLETED, FlowerError, default_app_dir
    from fedhealth.core.config import ConfigError

    try:
        bundle = CoordinatorBundle.load(dir)
        run_id, results_dir = launch.submit_run(bundle, app or default_app_dir(),
                                                run_config or [])
    except (BundleError, ConfigError, FlowerError) as err:
        raise _fail(str(err)) from None
    console.print(f"run {run_id} submitted; results go to {results_dir}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("rounds"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"run {run_id}", total=None)
        cli = launch.coordinator_cli(bundle)
        for line in cli.stream_log(run_id):
            if match := launch.ROUND_LINE.search(line):
                progress.update(task, completed=int(match[1]) - 1, total=int(match[2]))
            elif any(word in line.lower() for word in _NOTEWORTHY):
                progress.console.print(line.rstrip())
        status = cli.status(run_id)
        if status == COMPLETED:
            progress.update(task, completed=progress.tasks[0].total or 0)
    if status != COMPLETED:
        raise _fail(f"run {run_id} ended as '{status}'; see `flwr log {run_id}` with "
                    f"FLWR_HOME={bundle.root / 'flwr-home'}", code=1)
    console.print(f"[green]run {run_id} completed[/green]; results in {results_dir}")
    _print_results(results_dir)


def _print_results(results_dir: Path) -> None:
    """How each site did, so a coordinator need not open results.json (the ServerApp wrote it)."""
    import json

    from fedhealth.app.console import report_console
    from fedhealth.app.report import results_table
    from fedhealth.core.crypto import wire

    path = results_dir / wire.RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        console.print(f"[yellow]no per-site table: cannot read {path} ({err})[/yellow]")
        return
    if not results.get("per_site"):
        console.print(f"[yellow]no per-site table: no site's evaluation was valid; why is under "
                      f"'rejected' in {path}[/yellow]")
        return
    report_console().print(results_table([results]))


def site_start(
    config: Annotated[Path, typer.Option(help="The site's site.toml.")],
    max_wait: Annotated[float | None, typer.Option(
        help="Give up after this many seconds without reaching the SuperLink.")] = None,
    allow_any_app: Annotated[bool, typer.Option(
        help="DEVELOPMENT ONLY: run apps this site has not approved too.")] = False,
) -> None:
    """Check config, bring the data up to date with the PACS (\\[pacs] in site.toml), check the
    data, then run this site's SuperNode (TLS + node authentication) and its app gate: only
    apps approved with `fedhealth site approve` ever run here."""
    from fedhealth.app.deployment import launch
    from fedhealth.app.deployment.site_config import SiteConfigError, load_site_config, preflight

    try:
        site = load_site_config(config)
    except SiteConfigError as err:
        raise _fail(str(err)) from None
    _pull_from_pacs(site.source, site.data_dir, site.labels, site.audit_log)
    try:
        report = preflight(site)
    except SiteConfigError as err:
        raise _fail(str(err)) from None
    console.print(f"site {site.name}: {report.images} images, {report.patients} patients, "
                  f"{len(report.skipped)} files skipped; connecting to {site.superlink}")
    _announce_approvals(site.approved_apps, allow_any_app, config)
    _supervise({"flower-supernode": launch.supernode_command(site, max_wait),
                "app gate": launch.app_gate_command(site, allow_any_app)},
               launch.site_env(site), hint=_SITE_HINT)


def _announce_approvals(approved: frozenset[str], allow_any_app: bool, config: Path) -> None:
    if allow_any_app:
        console.print("[bold red]warning:[/bold red] --allow-any-app: this site will run ANY app "
                      "the coordinator submits, reviewed or not, with access to its data and "
                      "keys. Use it for development only.")
    elif not approved:
        console.print(f"[yellow]no app approved in {escape(str(config))} yet: every run is "
                      "refused until `fedhealth site approve FAB_OR_DIR` adds one[/yellow]")
    else:
        console.print(f"{len(approved)} approved app(s); any other is refused before it runs")


def site_approve(
    app: Annotated[Path, typer.Argument(
        help="The reviewed app: a .fab file (`flwr build` output) or its project folder, "
             "built as `flwr build` and `flwr run` build it.")],
    config: Annotated[Path, typer.Option(help="The site's site.toml.")] = Path("site.toml"),
) -> None:
    """Approve an app this site reviewed: print its FAB's sha256 and add it to the approved
    apps in site.toml. A running site applies it from its next instruction."""
    from sites.app_approval import FIELD, AppApprovalError, approve, fab_bytes, fab_sha256

    if not config.is_file():
        raise _fail(f"site config '{config}' does not exist; pass --config PATH/site.toml")
    try:
        fab_hash = fab_sha256(fab_bytes(app))
        added = approve(config, fab_hash)
    except AppApprovalError as err:
        raise _fail(str(err)) from None
    typer.echo(fab_hash)
    console.print(f"{'approved' if added else 'already approved'}: {escape(str(app))} "
                  f"({escape(FIELD)} in {escape(str(config))})")


def _pull_from_pacs(site_toml: Path, data_dir: Path, labels: Path | None, audit_log: Path) -> None:
    """`fedhealth site pull` with site.toml's [pacs] settings, if it has that section; the
    cohort is the label manifest's studies unless [pacs] names others."""
    from sites.pacs_client import PacsError
    from sites.pacs_settings import PacsSettingsError, site_toml_pull
    from sites.pull import pull

    manifest = labels or (data_dir / wire.LABELS_FILE)
    try:
        settings = site_toml_pull(site_toml, manifest if manifest.is_file() else None)
        if settings is None:
            return
        console.print(f"pulling from PACS {settings.pacs.name} into {data_dir}")
        result = pull(settings, data_dir, audit_log=audit_log)
    except (PacsSettingsError, PacsError) as err:
        raise _fail(str(err)) from None
    console.print(result.summary(data_dir))

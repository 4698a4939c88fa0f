"""`fedhealth site export`: a site's model as a MONAI Bundle (sites.bundle_export does the work).

Two ways to say where the site's state and key are: `--config site.toml` (a deployed site: its
state-dir, key-file, name and audit-log), or `--state-dir DIR --key-file FILE` (a simulated
site, whose state folder is `<state-dir>/<site>` of the run). This module lives in the app
layer because site.toml is parsed here (fedhealth.app.deployment.site_config).
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def export_command(
    out: Annotated[Path, typer.Option(help="New folder to write the bundle into.")],
    config: Annotated[Path | None, typer.Option(help="The site's site.toml.")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        help="Instead of --config: the site's state folder (simulation: <state-dir>/<site>).")] = None,
    key_file: Annotated[Path | None, typer.Option(
        help="Instead of --config: the federation's site.ctx.")] = None,
    site: Annotated[str | None, typer.Option(
        help="Site name, when the state folder holds several.")] = None,
    training_id: Annotated[str | None, typer.Option(
        help="Training to export; default: the site's most recent.")] = None,
    server_round: Annotated[int | None, typer.Option(
        "--round", min=1, help="Round to export; default: the last one the site kept.")] = None,
) -> None:
    """Decrypt the global with the site key, add the site's own layers, write a MONAI Bundle.

    The export is written to the site's audit log: the model leaves the federation's protection.
    """
    from fedhealth.app.deployment.site_config import SiteConfigError, load_site_config
    from sites.bundle_export import ExportError, export_bundle

    console = Console(stderr=True)
    audit_log = None
    try:
        if config is not None:
            if state_dir or key_file:
                raise ExportError("pass either --config or --state-dir with --key-file, not both")
            settings = load_site_config(config)
            state_dir, key_file = settings.state_dir, settings.key_file
            site, audit_log = site or settings.name, settings.audit_log
        elif state_dir is None or key_file is None:
            raise ExportError("say where the site's state and key are: --config site.toml, or "
                              "--state-dir DIR with --key-file site.ctx")
        bundle = export_bundle(state_dir, key_file, out, site=site, training_id=training_id,
                               server_round=server_round, audit_log=audit_log)
    except (ExportError, SiteConfigError) as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    facts = bundle.facts
    console.print(f"site {facts.site}: round {facts.server_round} of training "
                  f"{facts.training_id} ({facts.model}, {facts.policy}) -> {bundle.path}")

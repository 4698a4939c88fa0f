"""`fedhealth keys init`: a federation's CKKS key files.

TenSEAL loads only when the command runs, so `fedhealth --help` stays instant.
"""

from pathlib import Path

import typer
from rich.console import Console

from fedhealth.core.crypto.presets import PRESETS, get_preset


def keys_init(
    out: Path = typer.Option(..., "--out", help="Folder for site.ctx and aggregator.ctx."),
    preset: str = typer.Option("default", help=f"CKKS preset: {', '.join(PRESETS)}."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
    sites: str = typer.Option("", "--sites", help="Comma-separated site names: also write "
                              "node-keys/<site>.key + .pub, the reply-signing keys of a "
                              "simulation (a deployment uses each SuperNode's node.key)."),
) -> None:
    """Write site.ctx (secret key, mode 0600) and aggregator.ctx (parameters only)."""
    from fedhealth.core.crypto.keys import AGGREGATOR_FILE, SITE_FILE, init_key_files

    console = Console()
    try:
        params = get_preset(preset)
        names = [s.strip() for s in sites.split(",") if s.strip()]
        fingerprint = init_key_files(out, preset, sites=names, overwrite=force)
    except (ValueError, FileExistsError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"preset      {params.name} (N={params.poly_modulus_degree}, "
                  f"coeff_mod_bit_sizes={list(params.coeff_mod_bit_sizes)}, "
                  f"scale=2^{params.scale_bits})")
    console.print(f"site key    {out / SITE_FILE}  (secret: copy only to the federation's sites)")
    console.print(f"aggregator  {out / AGGREGATOR_FILE}  (parameters only: for the aggregator)")
    if names:
        console.print(f"signing     {out / 'node-keys'}  ({len(names)} sites: <site>.key secret, "
                      "<site>.pub for the aggregator)")
    console.print(f"fingerprint {fingerprint}")

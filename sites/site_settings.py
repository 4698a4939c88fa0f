"""Where this site's data, key and state live, from Flower's node config.

A deployed SuperNode names everything in its node config (`fedhealth site start` writes it
from site.toml). In the simulation engine a virtual node only has a `partition-id`: it then
plays the hospital folder of that rank under the run's `data-dir`, with the run's key folder.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedhealth.core.config import RunConfig

SITE_KEY_FILE = "site.ctx"


class SiteSettingsError(ValueError):
    """The node config does not say where this site's data or key is."""


@dataclass(frozen=True)
class SiteSettings:
    """Everything site-specific a ClientApp call needs to find on disk."""

    name: str
    data_dir: Path
    labels: Path | None
    key_file: Path
    state_dir: Path
    audit_log: Path


def resolve_site(node_config: Mapping[str, object], config: RunConfig) -> SiteSettings:
    """Settings from a deployed node's config, else the simulation's partition mapping."""
    if "data-dir" in node_config:
        return _deployed_site(node_config)
    if "partition-id" in node_config:
        return _simulated_site(int(node_config["partition-id"]), config)  # type: ignore[arg-type]
    raise SiteSettingsError(
        "node config has neither 'data-dir' (deployment) nor 'partition-id' (simulation); "
        "start the site with `fedhealth site start --config site.toml`")


def _deployed_site(node_config: Mapping[str, object]) -> SiteSettings:
    def required(key: str) -> Path:
        if key not in node_config:
            raise SiteSettingsError(f"node config is missing '{key}'; check site.toml")
        return Path(str(node_config[key]))

    data_dir = required("data-dir")
    labels = node_config.get("labels")
    state_dir = required("state-dir")
    return SiteSettings(
        name=str(node_config.get("site-name", data_dir.name)),
        data_dir=data_dir,
        labels=Path(str(labels)) if labels else None,
        key_file=required("key-file"),
        state_dir=state_dir,
        audit_log=Path(str(node_config.get("audit-log", state_dir / "audit.jsonl"))),
    )


def simulated_site_dirs(data_dir: Path) -> list[Path]:
    """Hospital folders of a synthetic federation, in site order (hidden folders excluded)."""
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _simulated_site(partition_id: int, config: RunConfig) -> SiteSettings:
    if not config.data_dir:
        raise SiteSettingsError("run config 'data-dir' is empty: point it at a federation "
                                "folder written by `fedhealth synth`")
    sites = simulated_site_dirs(Path(config.data_dir))
    if partition_id >= len(sites):
        raise SiteSettingsError(
            f"virtual node {partition_id} has no hospital folder: {config.data_dir} holds "
            f"{len(sites)} sites; run with num-supernodes <= {len(sites)}")
    data_dir = sites[partition_id]
    state_root = Path(config.state_dir) if config.state_dir else data_dir.parent / ".state"
    state_dir = state_root / data_dir.name
    return SiteSettings(
        name=data_dir.name,
        data_dir=data_dir,
        labels=None,
        key_file=Path(config.key_dir) / SITE_KEY_FILE,
        state_dir=state_dir,
        audit_log=state_dir / "audit.jsonl",
    )

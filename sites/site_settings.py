"""Where this site's data, key and state live, from Flower's node config.

A deployed SuperNode names everything in its node config (`fedhealth site start` writes it
from site.toml). In the simulation engine a virtual node only has a `partition-id`: it then
plays the hospital folder of that rank under the run's `data-dir`, with the run's key folder.

Optional node config keys, the site's own limits (defaults in brackets; see sites/README.md):
`max-image-mb` [200] largest image decoded, as its header declares it; `num-classes` [2];
`metric-decimals` [full precision], `withhold-metrics` [none, comma-separated names] and
`count-step` [1] limit what metrics and counts reveal; `max-epsilon` [none] is the site's own
differential-privacy budget per training (sites.privacy_budget).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.signing import private_key_path
from sites.data_limits import DataLimits, DataLimitsError
from sites.disclosure import DisclosureError, MetricDisclosure

# The site's own log of failures: the detail behind the reference an error reply carries.
ERROR_LOG_FILE = "errors.jsonl"
# The optional node config keys that set the site's limits (site.toml: the same names under [site]).
LIMIT_KEYS = ("max-image-mb", "num-classes", "metric-decimals", "withhold-metrics", "count-step",
              "max-epsilon")


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
    limits: DataLimits = field(default_factory=DataLimits)
    disclosure: MetricDisclosure = field(default_factory=MetricDisclosure)
    signing_key: Path | None = None  # signs every reply (deployed: node.key); None: unsigned
    max_epsilon: float | None = None  # the site's DP budget per training; None: no limit

    @property
    def error_log(self) -> Path:
        return self.state_dir / ERROR_LOG_FILE


def resolve_site(node_config: Mapping[str, object], config: RunConfig) -> SiteSettings:
    """Settings from a deployed node's config, else the simulation's partition mapping."""
    if "data-dir" in node_config:
        return _deployed_site(node_config)
    if "partition-id" in node_config:
        return _simulated_site(int(str(node_config["partition-id"])), config)
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
        signing_key=Path(str(node_config["node-key"])) if node_config.get("node-key") else None,
        state_dir=state_dir,
        audit_log=Path(str(node_config.get("audit-log", state_dir / "audit.jsonl"))),
        limits=data_limits(node_config),
        disclosure=metric_disclosure(node_config),
        max_epsilon=privacy_budget(node_config),
    )


def _number(node_config: Mapping[str, object], key: str, kind: type[int] | type[float]) -> object:
    """An optional number from the node config (None when absent), or SiteSettingsError.

    Flower passes `key=3` as an int and `key="3"` as a string: both are read; 2.5 is no integer.
    """
    value = node_config.get(key)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        number = kind(value)
        if number != float(value):
            raise ValueError
    except ValueError:
        raise SiteSettingsError(f"node config '{key}' must be "
                                f"{'an integer' if kind is int else 'a number'}, got {value!r}; "
                                "check site.toml") from None
    return number


def data_limits(node_config: Mapping[str, object]) -> DataLimits:
    """`max-image-mb` and `num-classes` of the node config (defaults where absent)."""
    values = {name: _number(node_config, key, kind) for name, key, kind in (
        ("max_image_mb", "max-image-mb", float), ("num_classes", "num-classes", int))}
    try:
        return DataLimits(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]
    except DataLimitsError as err:
        raise SiteSettingsError(f"node config: {err}; check site.toml") from None


def metric_disclosure(node_config: Mapping[str, object]) -> MetricDisclosure:
    """`metric-decimals`, `withhold-metrics` and `count-step` of the node config."""
    withheld = str(node_config.get("withhold-metrics", "") or "")
    count_step = _number(node_config, "count-step", int)
    try:
        return MetricDisclosure(
            decimals=_number(node_config, "metric-decimals", int),  # type: ignore[arg-type]
            withheld=frozenset(n.strip() for n in withheld.split(",") if n.strip()),
            count_step=1 if count_step is None else count_step)  # type: ignore[arg-type]
    except DisclosureError as err:
        raise SiteSettingsError(f"node config: {err}; check site.toml") from None


def privacy_budget(node_config: Mapping[str, object]) -> float | None:
    """`max-epsilon` of the node config: a positive number, or None when the site sets none."""
    budget = _number(node_config, "max-epsilon", float)
    if budget is not None and not 0 < budget < float("inf"):  # type: ignore[operator]
        raise SiteSettingsError(f"node config 'max-epsilon' must be a positive finite number, "
                                f"got {budget!r}; check site.toml")
    return budget  # type: ignore[return-value]


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
        key_file=Path(config.key_dir) / wire.SITE_KEY_FILE,
        signing_key=_simulated_signing_key(Path(config.key_dir), data_dir.name),
        state_dir=state_dir,
        audit_log=state_dir / "audit.jsonl",
    )


def _simulated_signing_key(key_dir: Path, site: str) -> Path | None:
    """`init_key_files(..., sites=...)` writes one per simulated site; without it, unsigned."""
    path = private_key_path(key_dir, site)
    return path if path.exists() else None

"""site.toml: the one file hospital IT edits, parsed and checked before a SuperNode starts.

Every problem is reported with the field, the file and what to do, so a site fails at
`fedhealth site start` instead of minutes later inside a round.
"""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedhealth.app.deployment import pki
from fedhealth.app.deployment.bundles import DEFAULT_RUNTIME_PORT, BundleError, split_address
from fedhealth.core.crypto.keys import KeyFileError, load_site_context
from sites.app_approval import AppApprovalError, approved_in
from sites.dataset import SiteDataError
from sites.site_check import SiteReport, check_site
from sites.site_settings import LIMIT_KEYS, SiteSettingsError, data_limits, metric_disclosure


class SiteConfigError(ValueError):
    """site.toml is unparsable, misses a field, or points at an unusable file."""


@dataclass(frozen=True)
class SiteConfig:
    """A parsed site.toml with every path made absolute."""

    source: Path
    name: str
    data_dir: Path
    labels: Path | None
    state_dir: Path
    audit_log: Path
    superlink: str
    ca_cert: Path
    node_private_key: Path
    key_file: Path
    runtime_port: int
    limits: dict[str, object] = field(default_factory=dict)  # [site] LIMIT_KEYS that are set
    approved_apps: frozenset[str] = frozenset()  # sites.app_approval's field; read again per task

    def node_config(self) -> str:
        """Flower `--node-config` string: what the ClientApp reads from `context.node_config`."""
        values = {"site-name": self.name, "data-dir": self.data_dir, "state-dir": self.state_dir,
                  "key-file": self.key_file, "audit-log": self.audit_log,
                  "node-key": self.node_private_key}  # also signs the site's replies
        if self.labels:
            values["labels"] = self.labels
        values.update(self.limits)
        return " ".join(f'{key}="{value}"' for key, value in values.items())


def _value(table: dict[str, object], section: str, key: str, source: Path, kind: type,
           required: bool) -> object:
    """`[section] key` of site.toml if set and of type `kind`; None if unset and optional."""
    values = table.get(section)
    value = values.get(key) if isinstance(values, dict) else None
    if value is None or value == "":
        if required:
            raise SiteConfigError(f"{source}: [{section}] {key} is not set; fill it in "
                                  "(see sites/README.md)")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SiteConfigError(f"{source}: [{section}] {key} must be a {kind.__name__}, got "
                              f"{value!r}")
    return value


def load_site_config(path: Path) -> SiteConfig:
    """Parse site.toml; relative paths are relative to its folder."""
    if not path.is_file():
        raise SiteConfigError(f"site config '{path}' does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SiteConfigError(f"{path} is not valid TOML: {err}") from err
    base = path.resolve().parent

    def text(section: str, key: str) -> str:
        return str(_value(table, section, key, path, str, required=True))

    def file(section: str, key: str) -> Path:
        return (base / text(section, key)).resolve()

    labels = _value(table, "site", "labels", path, str, required=False)
    superlink = text("superlink", "address")
    try:
        split_address(superlink)
    except BundleError as err:
        raise SiteConfigError(f"{path}: [superlink] address: {err}") from err
    runtime_port = _value(table, "supernode", "runtime-port", path, int, required=False)
    site = table.get("site")
    limits = {k: site[k] for k in LIMIT_KEYS if isinstance(site, dict) and k in site}
    try:  # checked here, so a wrong value stops `site start` rather than every round
        data_limits(limits), metric_disclosure(limits)
    except SiteSettingsError as err:
        raise SiteConfigError(f"{path}: [site] {err}") from err
    try:
        approved = approved_in(table, path)
    except AppApprovalError as err:
        raise SiteConfigError(str(err)) from err
    return SiteConfig(
        source=path.resolve(),
        name=text("site", "name"),
        data_dir=file("site", "data-dir"),
        labels=(base / str(labels)).resolve() if labels is not None else None,
        state_dir=file("site", "state-dir"),
        audit_log=file("site", "audit-log"),
        superlink=superlink,
        ca_cert=file("superlink", "ca-cert"),
        node_private_key=file("keys", "node-private-key"),
        key_file=file("keys", "key-file"),  # one name: node config too
        runtime_port=runtime_port if isinstance(runtime_port, int) else DEFAULT_RUNTIME_PORT,
        limits=limits,
        approved_apps=approved,
    )


def preflight(config: SiteConfig) -> SiteReport:
    """Check certificates, key files and permissions, then the data (the site check).

    Returns the site check's report; raises SiteConfigError on anything that would stop
    the site from joining or training.
    """
    try:
        pki.load_ca_cert(config.ca_cert)
        pki.load_node_private_key(config.node_private_key)
        pki.check_private_file(config.key_file, "CKKS secret context")
        load_site_context(config.key_file)
    except (pki.PkiError, KeyFileError) as err:
        raise SiteConfigError(f"{config.source}: {err}") from err
    try:
        report = check_site(config.data_dir, config.labels, limits=data_limits(config.limits))
    except SiteDataError as err:
        raise SiteConfigError(f"{config.source}: [site] data-dir: {err}") from err
    if report.images == 0:
        raise SiteConfigError(f"{config.source}: no usable labeled image in {config.data_dir} "
                              f"({len(report.skipped)} files skipped); run `fedhealth site "
                              f"check {config.data_dir}` to see why")
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return report

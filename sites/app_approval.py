"""The apps this site has reviewed: sha256 hashes of Flower App Bundles, in site.toml.

A FAB's hash is the sha256 of its bytes, the hash Flower itself computes when `flwr run` uploads
it and stores it under at the SuperNode. `fab_bytes` builds a project folder with Flower's own
build code (`flwr build`, `flwr run`), so the hash approved here is the one a run of that folder
arrives with. This module owns the site.toml field, `[apps] approved`; `fedhealth site approve`
writes it, `sites.app_gate` reads it before every ClientApp it would start.
"""

import hashlib
import re
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from fedhealth.core.atomic_file import write_atomically

APPS_SECTION = "apps"
APPROVED_KEY = "approved"
FIELD = f"[{APPS_SECTION}] {APPROVED_KEY}"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMENT = ("sha256 of each Flower App Bundle this site reviewed and runs, added with",
            "`fedhealth site approve FAB_OR_DIR`; any other app is refused before its code runs")


class AppApprovalError(ValueError):
    """The approved list is unreadable or malformed, or an app cannot be read or built."""


def fab_sha256(content: bytes) -> str:
    """The hash Flower gives a FAB: sha256 of its bytes, lowercase hex."""
    return hashlib.sha256(content).hexdigest()


def fab_bytes(path: Path) -> bytes:
    """A `.fab` file's bytes, or the FAB Flower builds from a project folder (`flwr build`)."""
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        try:
            return build_fab_from_disk(path)
        except (ValueError, OSError) as err:
            raise AppApprovalError(f"cannot build a Flower App Bundle from {path}: {err}") from err
    try:
        return path.read_bytes()
    except OSError as err:
        raise AppApprovalError(f"cannot read the app '{path}' ({err.strerror}): pass a .fab "
                               "file (`flwr build` output) or the app's project folder") from err


def approved_in(table: dict[str, object], source: Path) -> frozenset[str]:
    """The approved hashes of a parsed site.toml (none if it has no `[apps]` section)."""
    section = table.get(APPS_SECTION, {})
    values = section.get(APPROVED_KEY, []) if isinstance(section, dict) else section
    if not isinstance(values, list):
        raise AppApprovalError(f"{source}: {FIELD} must be a list of sha256 hashes, got "
                               f"{values!r}")
    for value in values:
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise AppApprovalError(f"{source}: {FIELD} holds {value!r}, not a sha256 hash (64 "
                                   "lowercase hex digits); add apps with `fedhealth site approve`")
    return frozenset(values)


def approved_apps(site_toml: Path) -> frozenset[str]:
    """The approved hashes in `site_toml`, read now (an approval takes effect at the next task)."""
    return approved_in(_load(site_toml), site_toml)


def approve(site_toml: Path, fab_hash: str) -> bool:
    """Add `fab_hash` to site.toml's approved list, keeping every comment and other field;
    False if it was already there."""
    document = _load(site_toml)
    approved_in(document, site_toml)  # refuse to extend a list that is already malformed
    section = document.get(APPS_SECTION)
    if section is None:
        section = tomlkit.table()
        for line in _COMMENT:
            section.add(tomlkit.comment(line))
        section.add(APPROVED_KEY, tomlkit.array().multiline(True))
        document.add(APPS_SECTION, section)
    approved = section.setdefault(APPROVED_KEY, tomlkit.array().multiline(True))
    if fab_hash in approved:
        return False
    approved.append(fab_hash)
    write_atomically(site_toml, tomlkit.dumps(document).encode(),
                     mode=site_toml.stat().st_mode & 0o777)
    return True


def _load(site_toml: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(site_toml.read_text())
    except OSError as err:
        raise AppApprovalError(f"cannot read site config '{site_toml}' ({err.strerror})") from err
    except TOMLKitError as err:
        raise AppApprovalError(f"{site_toml} is not valid TOML: {err}") from err

"""`fedhealth federation init`: everything each party of a federation needs, one folder each.

    OUT/ca/            the federation CA's key: keep it offline, it only re-issues certificates
    OUT/coordinator/   CA cert, SuperLink cert + key, the sites' public auth keys, aggregator.ctx
    OUT/<site>/        CA cert, the site's auth key pair, site.ctx (secret), site.toml

The secret CKKS context is written only into site folders, never into `coordinator/`.
"""

import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flwr.supercore.address import parse_address

from fedhealth.app.deployment import pki
from fedhealth.core.crypto.keys import AGGREGATOR_FILE, SITE_FILE, init_key_files
from fedhealth.core.crypto.signing import public_key_path

COORDINATOR = "coordinator"
CA_DIR = "ca"
FEDERATION_FILE = "federation.toml"
SITE_CONFIG_FILE = "site.toml"
# Local port of a SuperNode's runtime API (site.toml [supernode] runtime-port, 127.0.0.1 only).
DEFAULT_RUNTIME_PORT = 9094
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class BundleError(ValueError):
    """Bad `federation init` arguments, or a coordinator folder that is incomplete."""


@dataclass(frozen=True)
class CoordinatorBundle:
    """The coordinator's folder and what `federation start` / `federation run` read from it."""

    root: Path
    name: str
    superlink: str
    sites: tuple[str, ...]
    fingerprint: str

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    @property
    def key_dir(self) -> Path:
        """Run config `key-dir`: holds aggregator.ctx only."""
        return self.root / "keys"

    @property
    def results_dir(self) -> Path:
        """Run config `out-dir`: results and the encrypted checkpoint."""
        return self.root / "results"

    def node_public_key(self, site: str) -> Path:
        """In the key-dir, where the ServerApp also verifies the site's reply signatures."""
        return public_key_path(self.key_dir, site)

    @classmethod
    def load(cls, root: Path) -> "CoordinatorBundle":
        """Read `federation.toml` and check every file the SuperLink needs is there."""
        path = root / FEDERATION_FILE
        if not path.is_file():
            raise BundleError(f"'{root}' is not a coordinator folder: {FEDERATION_FILE} is "
                              "missing (create one with `fedhealth federation init`)")
        try:
            fed = tomllib.loads(path.read_text())["federation"]
            bundle = cls(root.resolve(), fed["name"], fed["superlink"], tuple(fed["sites"]),
                         fed["key-fingerprint"])
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as err:
            raise BundleError(f"{path} is damaged ({err!r}); regenerate the bundles") from err
        needed = [bundle.ca_cert, bundle.server_cert, bundle.server_key,
                  bundle.key_dir / AGGREGATOR_FILE,
                  *(bundle.node_public_key(s) for s in bundle.sites)]
        if missing := [str(p) for p in needed if not p.is_file()]:
            raise BundleError(f"coordinator folder '{root}' lacks: {', '.join(missing)}")
        return bundle


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) into host and port, or a BundleError."""
    parsed = parse_address(address)
    if not parsed:
        raise BundleError(f"SuperLink address '{address}' is not HOST:PORT")
    host, port, _ = parsed
    return str(host), int(port)


def parse_sites(sites: str) -> list[str]:
    """Comma-separated site names: lowercase, unique, usable as folder names."""
    names = [s.strip() for s in sites.split(",") if s.strip()]
    for name in names:
        if not _SITE_NAME.match(name) or name in (COORDINATOR, CA_DIR):
            raise BundleError(f"site name '{name}' is not allowed: use lowercase letters, "
                              f"digits, '-' or '_' (and not '{COORDINATOR}' or '{CA_DIR}')")
    if len(set(names)) != len(names) or len(names) < 2:
        raise BundleError(f"need at least two distinct site names, got '{sites}'")
    return names


def init_federation(name: str, sites: list[str], superlink: str, out: Path,
                    preset: str = "default") -> CoordinatorBundle:
    """Write the CA, coordinator and site bundles into `out` (which must be new or empty)."""
    host, _ = split_address(superlink)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"'{out}' is not empty: bundles are never overwritten in place")
    out.mkdir(parents=True, exist_ok=True)
    coord = out / COORDINATOR

    ca_key, ca_cert = pki.make_ca(name)
    server_key, server_cert = pki.make_server_cert(ca_key, ca_cert, host)
    pki.write_secret(out / CA_DIR / "ca.key", pki.key_pem(ca_key))
    pki.write_public(out / CA_DIR / "ca.pem", pki.cert_pem(ca_cert))
    pki.write_public(coord / "ca.pem", pki.cert_pem(ca_cert))
    pki.write_public(coord / "superlink.pem", pki.cert_pem(server_cert))
    pki.write_secret(coord / "superlink.key", pki.key_pem(server_key))

    with tempfile.TemporaryDirectory(dir=out, prefix=".keys-") as tmp:
        fingerprint = init_key_files(Path(tmp), preset)
        secret = (Path(tmp) / SITE_FILE).read_bytes()
        (coord / "keys").mkdir()
        shutil.copyfile(Path(tmp) / AGGREGATOR_FILE, coord / "keys" / AGGREGATOR_FILE)

    for site in sites:
        private, public = pki.make_node_keypair()
        folder = out / site
        pki.write_public(folder / "ca.pem", pki.cert_pem(ca_cert))
        pki.write_secret(folder / "node.key", private)
        pki.write_public(folder / "node.pub", public)
        pki.write_public(public_key_path(coord / "keys", site), public)
        pki.write_secret(folder / SITE_FILE, secret)
        (folder / SITE_CONFIG_FILE).write_text(site_toml(name, site, superlink))

    (coord / FEDERATION_FILE).write_text(_federation_toml(name, superlink, sites, fingerprint,
                                                          preset))
    return CoordinatorBundle.load(coord)


def _federation_toml(name: str, superlink: str, sites: list[str], fingerprint: str,
                     preset: str) -> str:
    site_list = ", ".join(f'"{s}"' for s in sites)
    return (f'[federation]\nname = "{name}"\nsuperlink = "{superlink}"\n'
            f'sites = [{site_list}]\nkey-fingerprint = "{fingerprint}"\n'
            f'crypto-preset = "{preset}"\n')


def site_toml(federation: str, site: str, superlink: str) -> str:
    """The site.toml template a hospital fills in (only `data-dir` is required)."""
    return f'''# fedhealth site configuration: site "{site}" of federation "{federation}".
# Relative paths are relative to this file's folder. See sites/README.md for every field.

[site]
name = "{site}"
data-dir = ""              # REQUIRED: folder with this site's DICOM files (any layout)
labels = ""                # labels CSV; empty means <data-dir>/labels.csv
state-dir = "state"        # personal layers and SuperNode state; never leaves the site
audit-log = "audit.jsonl"  # one JSON line per message this site sends

[superlink]
address = "{superlink}"    # the coordinator's SuperLink; the site only connects outbound
ca-cert = "ca.pem"         # the federation CA; the SuperLink must present a cert it signed

[keys]
node-private-key = "node.key"  # SuperNode authentication key (mode 0600)
key-file = "site.ctx"          # the federation's secret CKKS context (mode 0600)

[supernode]
runtime-port = {DEFAULT_RUNTIME_PORT}        # local port of the SuperNode's runtime API (127.0.0.1 only)
'''

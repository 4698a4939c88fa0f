"""`federation init`: certificates Flower accepts, keys where they belong, nothing secret at the
coordinator."""

import stat
from pathlib import Path

import pytest
import tenseal as ts
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.deployment import pki
from fedhealth.app.deployment.bundles import (
    BundleError,
    CoordinatorBundle,
    init_federation,
    parse_sites,
)
from fedhealth.core.crypto.aggregator_key import load_aggregator_context
from fedhealth.core.crypto.keyfile import KeyFile, KeyFileError
from fedhealth.core.crypto.keys import load_site_context

SITES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "bundles"
    init_federation("test", SITES, "superlink.example.org:9093", out)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_and_permissions(federation: Path) -> None:
    bundle = CoordinatorBundle.load(federation / "coordinator")
    assert bundle.sites == tuple(SITES) and bundle.superlink == "superlink.example.org:9093"
    assert _mode(bundle.server_key) == 0o600 and _mode(federation / "ca" / "ca.key") == 0o600
    for site in SITES:
        assert _mode(federation / site / "node.key") == 0o600
        assert _mode(federation / site / "site.ctx") == 0o600
        assert (federation / site / "site.toml").is_file()
        assert (federation / site / "ca.pem").read_bytes() == bundle.ca_cert.read_bytes()
        assert not (federation / site / "ca.key").exists()


def test_superlink_certificate_names_the_host_and_chains_to_the_ca(federation: Path) -> None:
    coord = federation / "coordinator"
    ca = pki.load_ca_cert(coord / "ca.pem")
    cert = pki.check_server_cert(coord / "superlink.pem", ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    with pytest.raises(pki.PkiError, match="not issued by this federation's CA"):
        pki.check_server_cert(coord / "superlink.pem", pki.make_ca("other")[1])


def test_ip_address_goes_into_san_as_ip(tmp_path: Path) -> None:
    ca_key, ca = pki.make_ca("t")
    _, cert = pki.make_server_cert(ca_key, ca, "127.0.0.1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_node_keys_are_what_flower_loads(federation: Path) -> None:
    """Flower's own loaders: `flwr supernode register` and `flower-supernode`."""
    for site in SITES:
        registered = try_load_public_key(federation / "coordinator" / "keys" / "node-keys" / f"{site}.pub")
        private = load_ssh_private_key((federation / site / "node.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert public_key_to_bytes(private.public_key()) == registered
        signature = private.sign(b"ts", ec.ECDSA(hashes.SHA256()))
        private.public_key().verify(signature, b"ts", ec.ECDSA(hashes.SHA256()))
    keys = {(federation / s / "node.pub").read_bytes() for s in SITES}
    assert len(keys) == len(SITES)


def test_coordinator_holds_no_secret_he_context(federation: Path) -> None:
    """Every file of the coordinator folder, tried as a key file and as a raw TenSEAL context."""
    coord_files = [p for p in (federation / "coordinator").rglob("*") if p.is_file()]
    assert coord_files
    for path in coord_files:
        with pytest.raises(KeyFileError):
            load_site_context(path)
        data = path.read_bytes()
        try:
            context = ts.context_from(KeyFile.from_bytes(data, str(path)).context_bytes)
        except KeyFileError:
            continue  # not a key file at all
        assert not context.has_secret_key(), path
    aggregator = load_aggregator_context(federation / "coordinator" / "keys" / "aggregator.ctx")
    for site in SITES:
        assert load_site_context(federation / site / "site.ctx").fingerprint == aggregator.fingerprint


def test_refuses_bad_arguments(tmp_path: Path, federation: Path) -> None:
    with pytest.raises(BundleError, match="not empty"):
        init_federation("again", SITES, "h:1", federation)
    with pytest.raises(BundleError, match="HOST:PORT"):
        init_federation("x", SITES, "https://h", tmp_path / "x")
    for bad in ("a,a", "a", "a,Coordinator", "a,coordinator", "a,../b"):
        with pytest.raises(BundleError):
            parse_sites(bad)
    assert parse_sites(" a, b ,c ") == SITES


def test_incomplete_coordinator_folder_is_named(tmp_path: Path, federation: Path) -> None:
    with pytest.raises(BundleError, match="federation.toml is missing"):
        CoordinatorBundle.load(tmp_path)
    broken = tmp_path / "coord"
    broken.mkdir()
    (broken / "federation.toml").write_text((federation / "coordinator" / "federation.toml")
                                            .read_text())
    with pytest.raises(BundleError, match="lacks: .*ca.pem"):
        CoordinatorBundle.load(broken)


def test_federation_run_refuses_a_bad_run_config_before_submitting(federation: Path) -> None:
    coordinator = federation / "coordinator"
    result = CliRunner().invoke(app, ["federation", "run", "--dir", str(coordinator),
                                      "--run-config", "policy='fedbm' num-server-rounds=2"])
    assert result.exit_code == 2
    assert "'policy' is 'fedbm': choose one of" in result.output
    assert not (coordinator / "results").exists()  # nothing was submitted
    assert not (coordinator / "flwr-home").exists()  # Flower's CLI was never called

"""Certificates and SuperNode keys, made and checked with `cryptography` (no openssl calls).

The federation has its own CA: the SuperLink's TLS certificate is signed by it and sites trust
only it. SuperNode authentication keys are the OpenSSH EC keys Flower expects (NIST P-384).
"""

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhealth.core import secret_file
from fedhealth.core.crypto.keys import new_signing_keypair

CA_DAYS = 3650
SERVER_DAYS = 825
_CURVE = ec.SECP384R1()


class PkiError(ValueError):
    """A certificate or key file is missing, malformed, expired or too readable."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhealth"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(federation: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA for one federation; it signs only the SuperLink's certificate."""
    key = ec.generate_private_key(_CURVE)
    name = _name(f"{federation} federation CA")
    cert = (_builder(name, name, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     host: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate; `host` (DNS name or IP) goes in its SAN."""
    key = ec.generate_private_key(_CURVE)
    cert = (_builder(_name(host), ca_cert.subject, key.public_key(), SERVER_DAYS)
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_node_keypair() -> tuple[bytes, bytes]:
    """A SuperNode auth key pair as (OpenSSH private key, OpenSSH public key) bytes; the
    ClientApp signs its replies with the same key (fedhealth.core.crypto.signing)."""
    return new_signing_keypair()


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_secret(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """The one rule for secrets (fedhealth.core.secret_file): atomic, 0600 from the first
    byte, an existing file replaced only with `overwrite`."""
    secret_file.write_secret(path, data, overwrite=overwrite)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that is missing or readable by group or others."""
    if not path.is_file():
        raise PkiError(f"{what} '{path}' does not exist")
    try:
        secret_file.require_owner_only(path, path.stat().st_mode, what)
    except secret_file.SecretFileError as err:
        raise PkiError(str(err)) from None


def load_ca_cert(path: Path) -> x509.Certificate:
    """Load a CA certificate and check it is one and is currently valid."""
    if not path.is_file():
        raise PkiError(f"CA certificate '{path}' does not exist")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise PkiError(f"CA certificate '{path}' is not a PEM certificate ({err}); copy "
                       "ca.pem from your site bundle again") from err
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(f"'{path}' is not a CA certificate; use ca.pem from your site bundle")
    _check_dates(cert, path)
    return cert


def check_server_cert(cert_path: Path, ca_cert: x509.Certificate) -> x509.Certificate:
    """Check the SuperLink certificate is valid now and was signed by the federation CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as err:
        raise PkiError(f"SuperLink certificate '{cert_path}' cannot be read ({err})") from err
    _check_dates(cert, cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as err:
        raise PkiError(f"SuperLink certificate '{cert_path}' was not issued by this "
                       f"federation's CA: {err}") from err
    return cert


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode auth private key (OpenSSH, NIST EC), checking its permissions."""
    check_private_file(path, "SuperNode private key")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise PkiError(f"SuperNode private key '{path}' is not an unencrypted OpenSSH key "
                       f"({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"SuperNode private key '{path}' is not an EC key; Flower needs one "
                       "on a NIST curve (P-384 from `fedhealth federation init`)")
    return key


def _check_dates(cert: x509.Certificate, path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"certificate '{path}' is valid only from {cert.not_valid_before_utc} "
                       f"to {cert.not_valid_after_utc}; ask the coordinator for a new one")

"""Site key files: creating a federation's keys and loading the secret ones.

Only `sites/` and the `fedhealth keys` command import this module: it loads the CKKS secret
context and the sites' private signing keys. Every secret is written and read by the one rule
of `fedhealth.core.secret_file` (atomic, owner-only, never replaced by accident).
"""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhealth.core.atomic_file import write_atomically
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import AggregatorKey, load_aggregator_context
from fedhealth.core.crypto.keyfile import KeyFile, KeyFileError, LoadedKey, params_only
from fedhealth.core.crypto.presets import get_preset
from fedhealth.core.crypto.signing import (
    CURVE,
    HASH,
    ReplyFacts,
    SignatureError,
    private_key_path,
    public_key_path,
)
from fedhealth.core.secret_file import (
    SecretFileError,
    read_secret,
    require_owner_only,
    write_secret,
)

__all__ = [
    "AGGREGATOR_FILE",
    "SITE_FILE",
    "AggregatorKey",
    "KeyFileError",
    "SigningKey",
    "SiteKey",
    "init_key_files",
    "load_aggregator_context",
    "load_site_context",
    "new_signing_keypair",
]

SITE_FILE, AGGREGATOR_FILE = wire.SITE_KEY_FILE, wire.AGGREGATOR_KEY_FILE  # named in `wire`


class SiteKey(LoadedKey):
    """A context holding the federation's secret key, its preset and fingerprint."""

    @classmethod
    def check(cls, context: ts.Context, source: str) -> None:
        if not context.has_secret_key():
            raise KeyFileError(
                f"{source} holds no secret key (it looks like the aggregator's params-only "
                "file): a site needs site.ctx from `fedhealth keys init`"
            )

    @classmethod
    def check_mode(cls, path: Path, st_mode: int) -> None:
        """Refuses a site.ctx that group or others may read, on every path that loads one."""
        try:
            require_owner_only(path, st_mode, "CKKS secret context")
        except SecretFileError as exc:
            raise KeyFileError(str(exc)) from None


def load_site_context(path: Path | str) -> SiteKey:
    """Load `site.ctx`; refuses a context without a secret key, or readable by others."""
    return SiteKey.load(path)


@dataclass(frozen=True, eq=False)
class SigningKey:
    """A site's private ECDSA P-384 key, which signs the facts of each reply it sends."""

    site: str
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, path: Path, site: str) -> "SigningKey":
        """An OpenSSH private key (Flower's SuperNode `node.key`), owner-only."""
        try:
            raw = read_secret(path, "signing key")
            key = serialization.load_ssh_private_key(raw, None)
        except (SecretFileError, ValueError, TypeError) as exc:
            raise SignatureError(f"site {site}: cannot use signing key {path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
            raise SignatureError(f"site {site}: {path} is not an ECDSA {CURVE.name} key")
        return cls(site, key)

    def sign(self, facts: ReplyFacts) -> bytes:
        if facts.site != self.site:
            raise SignatureError(f"key of site {self.site} asked to sign for site {facts.site}")
        return self.key.sign(facts.payload(), ec.ECDSA(HASH))


def new_signing_keypair() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line): the format Flower's SuperNode reads."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def init_key_files(out_dir: Path, preset: str = "default", *, sites: Sequence[str] = (),
                   overwrite: bool = False) -> str:
    """Write `site.ctx` (secret, 0600), `aggregator.ctx` (params only) and, for each of `sites`,
    a signing key pair `node-keys/<site>.key` (0600) + `.pub`; return the fingerprint.

    Signing keys here serve the simulation, where every virtual site runs on this machine; a
    deployment signs with each SuperNode's own `node.key` instead. Symmetric encryption: sites
    share the secret key anyway, and it encrypts ~1.9x faster than public-key encryption at the
    same ciphertext size (DESIGN, "Crypto").
    """
    params = get_preset(preset)
    out_dir = Path(out_dir)
    planned = [out_dir / SITE_FILE, out_dir / AGGREGATOR_FILE,
               *(p for s in sites for p in (private_key_path(out_dir, s), public_key_path(out_dir, s)))]
    if not overwrite and (existing := [str(p) for p in planned if p.exists()]):
        raise FileExistsError(f"{', '.join(existing)} exist: keys of a running federation must "
                              "not be replaced by accident; pass --force to overwrite")
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = params.scale
    federation = secrets.token_hex(16)
    secret_bytes = context.serialize(save_public_key=False, save_secret_key=True,
                                     save_galois_keys=False, save_relin_keys=False)
    site = KeyFile("site", params, federation, secret_bytes)
    aggregator = KeyFile("aggregator", params, federation, params_only(context))
    write_secret(out_dir / SITE_FILE, site.to_bytes(), overwrite=overwrite)
    write_atomically(out_dir / AGGREGATOR_FILE, aggregator.to_bytes(), mode=0o644)
    for name in sites:
        private, public = new_signing_keypair()
        write_secret(private_key_path(out_dir, name), private, overwrite=overwrite)
        write_atomically(public_key_path(out_dir, name), public, mode=0o644)
    return site.fingerprint(context)

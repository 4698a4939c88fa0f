"""Signatures that bind a site's reply to one training, round, instruction and site.

The aggregator cannot read what it sums, so it cannot tell a stale or copied ciphertext from a
fresh one by content. Each site therefore signs, with its own ECDSA P-384 key (in a deployment
the SuperNode's `node.key`), the facts its reply asserts; the aggregator rebuilds those facts
from its own state (its training id, round, the nonce it sent that node, the a_k it assigned)
and verifies them with the site's registered public key. A replayed reply carries an old
nonce, a reply passed off as another site's carries the wrong signer, a changed ciphertext
changes the digest: each is refused before it is added. This module holds no secret: the
private half is loaded by `fedhealth.core.crypto.keys`, which only sites import.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNING_KEYS_DIR = "node-keys"
"""Folder of a key-dir holding `<site>.pub` (the aggregator) and, in simulation, `<site>.key`."""

CURVE = ec.SECP384R1()  # what Flower's SuperNode authentication uses, so node.key serves both
HASH = hashes.SHA384()
_DOMAIN = "fedhealth-reply/1"


class SignatureError(ValueError):
    """A reply's signature is missing, unverifiable, by another key, or its content was seen."""


@dataclass(frozen=True)
class ReplyFacts:
    """What a signature vouches for. The aggregator fills these from its own state, never
    from the reply, so a reply that claims anything else fails verification."""

    kind: str  # "train" or "evaluate"
    training_id: str
    server_round: int
    nonce: str
    site: str
    ciphertext_digest: str  # `ciphertext_digest()` of the update; "" for evaluate replies
    num_examples: int
    site_weight: float  # the a_k the site multiplied by (0.0 for evaluate replies)

    def payload(self) -> bytes:
        """Canonical bytes: sorted JSON (floats written exactly, as repr does)."""
        return json.dumps({"domain": _DOMAIN, **asdict(self)}, sort_keys=True,
                          separators=(",", ":")).encode()


def ciphertext_digest(blobs: Sequence[bytes]) -> str:
    """sha256 over the ciphertexts in order, each prefixed by its length (no ambiguity)."""
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(len(blob).to_bytes(8, "big"))
        digest.update(blob)
    return digest.hexdigest()


def public_key_path(key_dir: Path, site: str) -> Path:
    return Path(key_dir) / SIGNING_KEYS_DIR / f"{_file_stem(site)}.pub"


def private_key_path(key_dir: Path, site: str) -> Path:
    return Path(key_dir) / SIGNING_KEYS_DIR / f"{_file_stem(site)}.key"


def _file_stem(site: str) -> str:
    """A site name usable as a file name inside the folder (no separator, not hidden)."""
    if not site or site.startswith(".") or "/" in site or "\\" in site or "\0" in site:
        raise SignatureError(f"site name {site!r} cannot name a key file: use letters, digits, "
                             "'-', '_' or '.' (not first)")
    return site


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH ECDSA P-384 public key (`node.pub`, `node-keys/<site>.pub`)."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot load the signing public key {path} ({exc}); copy the "
                             "site's node.pub there again") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise SignatureError(f"{path} is not an ECDSA {CURVE.name} public key")
    return key


class ReplyVerifier:
    """Checks each reply's signature against its site's registered key, and that no two
    replies of a training carry the same ciphertexts.

    CKKS encryption is randomised, so an honest site never sends a ciphertext twice: equal
    digests mean a copy of another site's update or a replay of an earlier one. The first
    reply with a digest is kept (a copy can only be made of a reply that already exists),
    later ones are refused.
    """

    def __init__(self, public_keys: Mapping[str, ec.EllipticCurvePublicKey], source: str) -> None:
        self.public_keys = dict(public_keys)
        self.source = source
        self._seen: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_key_dir(cls, key_dir: Path) -> "ReplyVerifier | None":
        """Every `<site>.pub` under `key_dir/node-keys`, or None when that folder is absent."""
        folder = Path(key_dir) / SIGNING_KEYS_DIR
        if not folder.is_dir():
            return None
        keys = {path.stem: load_public_key(path) for path in sorted(folder.glob("*.pub"))}
        if not keys:
            raise SignatureError(f"{folder} holds no <site>.pub: register every site's public "
                                 "key there, or remove the folder to run without signatures")
        return cls(keys, str(folder))

    def verify(self, facts: ReplyFacts, signature: object) -> None:
        """Raise SignatureError unless `signature` is `facts.site`'s over exactly `facts`."""
        key = self.public_keys.get(facts.site)
        if key is None:
            raise SignatureError(f"site {facts.site!r} has no registered signing key in "
                                 f"{self.source}")
        if not isinstance(signature, bytes) or not signature:
            raise SignatureError("the reply carries no signature")
        try:
            key.verify(signature, facts.payload(), ec.ECDSA(HASH))
        except InvalidSignature:
            raise SignatureError(
                f"the signature is not {facts.site}'s over this {facts.kind} reply to round "
                f"{facts.server_round} (nonce {facts.nonce[:12]}): a replay, a reply from another "
                "site, or content changed after signing") from None
        if facts.ciphertext_digest:
            if (first := self._seen.get(facts.ciphertext_digest)) is not None:
                raise SignatureError(
                    f"its ciphertexts are identical to those {first[0]} sent in round "
                    f"{first[1]}: a copy or a replay (fresh encryptions never repeat)")
            self._seen[facts.ciphertext_digest] = (facts.site, facts.server_round)

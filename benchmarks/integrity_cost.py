"""What integrity costs: check values (bytes, site-side ms) and reply signatures (bytes, ms).

    python benchmarks/integrity_cost.py --params 1000000 --json OUT.json

Check values: the ciphertext count with and without the 4 reserved values per ciphertext (for
`--params` and for DenseNet121's shared size), and the site-side work they add: deriving the
constants, packing them in, splitting them out and verifying them, against the encryption and
decryption of the same update. Signatures: bytes of one signature, and the sha256 digest of the
update, signing and verifying. Each step runs `--repeat` times and its fastest run counts.
"""

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Console

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import (
    Packing,
    RoundBinding,
    check_values,
    decrypt_global,
    decrypt_vector,
    encrypt_update,
    encrypt_vector,
    verify_checks,
)
from fedhealth.core.crypto.keys import SigningKey, init_key_files, load_site_context
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.signing import ReplyFacts, ReplyVerifier, ciphertext_digest

DENSENET121_SHARED = 6_955_906  # MONAI DenseNet121, 2D, one channel, two classes
T = TypeVar("T")


def fastest(repeat: int, step: Callable[[], T]) -> tuple[float, T]:
    """Best wall-clock seconds over `repeat` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = step()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]


def measure(params: int, preset: str, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        init_key_files(Path(tmp), preset, sites=["site"])
        key = load_site_context(Path(tmp) / wire.SITE_KEY_FILE)
        signer = SigningKey.load(Path(tmp) / "node-keys" / "site.key", "site")
        verifier = ReplyVerifier.from_key_dir(Path(tmp))
    assert verifier is not None
    per = key.preset.values_per_ciphertext
    tensors = {"w": np.random.default_rng(0).normal(size=params)}
    layout, binding = TensorLayout.of(tensors), RoundBinding("training", 1)
    packing = Packing.of(params, key.preset)
    fastest(1, lambda: encrypt_vector(key, tensors["w"]))  # warm up SEAL
    encrypt_s, blobs = fastest(repeat, lambda: encrypt_vector(key, tensors["w"] * 0.5))
    decrypt_s, _ = fastest(repeat, lambda: decrypt_vector(key, blobs, params))
    record = encrypt_update(key, tensors, 0.5, binding=binding)
    constants_s, constants = fastest(repeat, lambda: check_values(binding, packing.ciphertexts))
    join_s, payload = fastest(repeat, lambda: packing.join(tensors["w"], constants))
    split_s, (_, found) = fastest(repeat, lambda: packing.split(payload))
    verify_s, _ = fastest(repeat, lambda: verify_checks(found * 0.5, binding, 0.5))
    decrypt_global(key, record, layout, 0.5, binding=binding)  # the checks pass
    ciphertexts = wire.record_to_ciphertexts(record)
    digest_s, digest = fastest(repeat, lambda: ciphertext_digest(ciphertexts))
    facts = ReplyFacts("train", "training", 1, "0" * 32, "site", digest, 100, 0.5)
    sign_s, signature = fastest(repeat, lambda: signer.sign(facts))

    def verify() -> None:
        verifier._seen.clear()  # the same reply, verified as if for the first time
        verifier.verify(facts, signature)
    verify_signature_s, _ = fastest(repeat, verify)
    return {
        "params": params, "ciphertexts_without_checks": -(-params // per),
        "ciphertexts_with_checks": packing.ciphertexts,
        "densenet121_ciphertexts_without_checks": -(-DENSENET121_SHARED // per),
        "densenet121_ciphertexts_with_checks": Packing.of(DENSENET121_SHARED, key.preset).ciphertexts,
        "update_bytes": sum(map(len, ciphertexts)),
        "encrypt_ms": encrypt_s * 1e3, "decrypt_ms": decrypt_s * 1e3,
        "check_constants_ms": constants_s * 1e3, "check_join_ms": join_s * 1e3,
        "check_split_ms": split_s * 1e3, "check_verify_ms": verify_s * 1e3,
        "signature_bytes": len(signature), "digest_ms": digest_s * 1e3, "sign_ms": sign_s * 1e3,
        "verify_signature_ms": verify_signature_s * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.params, args.preset, args.repeat)
    console = Console()
    for name, value in result.items():
        console.print(f"{name:42s} {value:,.2f}" if isinstance(value, float) else
                      f"{name:42s} {value:,}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

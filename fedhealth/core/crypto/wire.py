"""Record names and the ciphertext <-> ArrayRecord mapping both sides of a round agree on.

Instruction (aggregator -> site), a RecordDict with:
  `fh.global`  ArrayRecord, the encrypted global E(sum a_k w_k): `ct-00000`, `ct-00001`, ...
               (uint8 arrays, each a serialized TenSEAL CKKSVector of one SEAL ciphertext);
               absent in round 1, when sites start from the run seed's initialisation
  `fh.crypto`  ConfigRecord: `server-round`, `weight-sum` (s), `site-weight` (this site's a_k),
               `layout-hash` ("" until the first round fixed it), `key-fingerprint`,
               `training-id` (names the training across coordinator restarts: sites key
               their personal layers by it, so a resumed run finds them)
  `config`     ConfigRecord: the ServerApp's train/evaluate config, plus `server-round`
Census query (aggregator -> site, message type `query`): `fh.census` ConfigRecord with
  `key-fingerprint`, and `config` (the run config, so the site can find its data).
Replies (site -> aggregator):
  `fh.update`  ArrayRecord of ciphertexts E(a_k w_k) (train replies only), named like
               `fh.global`'s; with the `compact` preset in SEAL's seeded form (the uniform
               polynomial sent as its seed; TenSEAL expands it on load)
  `metrics`    MetricRecord: `num-examples` and the site's plaintext metrics
  `fh.crypto`  ConfigRecord: `site`, `key-fingerprint`, and in train replies `layout-hash`
               and `site-weight` (the a_k the site multiplied by)
Packing: the flat vector is cut into chunks of the preset's `values_per_ciphertext`; with
complex slots (all presets but `nvflare`) values 2i and 2i+1 of a chunk are the real and
imaginary part of slot i, so a ciphertext's TenSEAL size counts slots, not values.
"""

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

GLOBAL = "fh.global"
UPDATE = "fh.update"
CRYPTO = "fh.crypto"
CENSUS = "fh.census"
CONFIG = "config"
METRICS = "metrics"

SERVER_ROUND = "server-round"
WEIGHT_SUM = "weight-sum"
SITE_WEIGHT = "site-weight"
LAYOUT_HASH = "layout-hash"
FINGERPRINT = "key-fingerprint"
TRAINING_ID = "training-id"
SITE = "site"
NUM_EXAMPLES = "num-examples"


def ciphertexts_to_record(blobs: list[bytes]) -> ArrayRecord:
    """Serialized ciphertexts as uint8 arrays; Flower chunks large arrays itself."""
    return ArrayRecord({f"ct-{i:05d}": Array(np.frombuffer(b, dtype=np.uint8))
                        for i, b in enumerate(blobs)})


def record_to_ciphertexts(record: ArrayRecord) -> list[bytes]:
    """The inverse of `ciphertexts_to_record`; refuses foreign names, gaps and non-uint8 arrays.

    An Array holds an .npy file, which ends with the raw bytes: slicing them off copies once,
    where `Array.numpy().tobytes()` copies twice and parses the header.
    """
    expected = [f"ct-{i:05d}" for i in range(len(record))]
    if sorted(record.keys()) != expected:
        raise ValueError("ciphertext names must be ct-00000 .. without gaps, got "
                         f"{sorted(record.keys())[:3]}...")
    blobs = []
    for name in expected:
        array = record[name]
        if (array.dtype != "uint8" or len(array.shape) != 1 or array.stype != SType.NUMPY
                or not 0 < array.shape[0] < len(array.data)):
            raise ValueError(f"{name} must be a non-empty 1-D uint8 numpy array, got "
                             f"{array.stype} {array.dtype} {array.shape}")
        blobs.append(array.data[-array.shape[0]:])
    return blobs


def chunk_sizes(size: int, per_ciphertext: int) -> list[int]:
    """How many values each ciphertext of a `size`-value vector holds (all full but the last)."""
    full, rest = divmod(size, per_ciphertext)
    return [per_ciphertext] * full + ([rest] if rest else [])

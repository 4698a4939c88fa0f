"""The wire and file vocabulary: every record, field and file name both sides agree on, once.

Instruction (aggregator -> site, message type `train` or `evaluate`), a RecordDict with:
  `fh.global`  ArrayRecord, the encrypted global E(sum a_k w_k): `ct-00000`, `ct-00001`, ...
               (each one serialized TenSEAL CKKSVector of one SEAL ciphertext, see below);
               absent in round 1, when sites start from the run seed's initialisation
  `fh.crypto`  ConfigRecord: `server-round`, `weight-sum` (s), `site-weight` (this site's a_k),
               `layout-hash` ("" until the first round fixed it), `key-fingerprint`,
               `training-id` (names the training across coordinator restarts: sites key
               their personal layers by it, so a resumed run finds them), `nonce` (fresh and
               random per site and round: what a site's signature binds its reply to),
               `global-round` (the round whose replies `fh.global` sums; its check values)
  `config`     ConfigRecord: the ServerApp's train/evaluate config, plus `server-round`
Census query (aggregator -> site, message type `query`): `fh.census` ConfigRecord with
  `key-fingerprint`, `training-id` and `nonce`, and `config` (the run config, so the site can
  find its data).
Replies (site -> aggregator), exactly these records and no other:
  `fh.update`  ArrayRecord of ciphertexts E(a_k w_k) (train replies only), named like
               `fh.global`'s; with the `compact` preset in SEAL's seeded form (the uniform
               polynomial sent as its seed; TenSEAL expands it on load)
  `metrics`    MetricRecord: `num-examples` and the site's plaintext metrics (finite scalars)
  `fh.crypto`  ConfigRecord: `site` (the site's name: the only place a reply names its site),
               `key-fingerprint`, `signature` (the site's, `fedhealth.core.crypto.signing`),
               `refused-global` when the site refused a global whose check values failed, and
               in train replies `layout-hash` and `site-weight` (the a_k the site multiplied
               by). Plaintext replies (Flower FedAvg's `arrays` + `metrics`)
               carry it too, with `site` alone. A reply never says which round it answers: the
               aggregator knows which round it is in. A reply with any other record is refused:
               a new record must be named here and admitted in `strategies.reply_check`.
Ciphertexts travel as Flower `Array`s of stype `fedhealth.ckks`: `data` is the ciphertext's
bytes as they are (nothing to parse to reach them), `dtype` uint8 and `shape` (len(data),).
Packing: the flat vector is cut into chunks of the preset's `values_per_ciphertext` less the
check values `fedhealth.core.crypto.codec` puts at the end of every ciphertext; with
complex slots (all presets but `nvflare`) values 2i and 2i+1 of a chunk are the real and
imaginary part of slot i, so a ciphertext's TenSEAL size counts slots, not values. With a
quantized preset (`packed`) each value is itself several parameters' integer counts as base-2^b
digits, and the update starts with header ciphertexts (`codec.Header`: 1, r_t and r_t^2 per
tensor, unweighted); the aggregator adds them like any other.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names above are read by light paths (site check, synth): Flower loads
    from flwr.app import Array, ArrayRecord  # only when ciphertexts are mapped, below

# ---------------------------------------------------------------- record names
GLOBAL = "fh.global"
UPDATE = "fh.update"
CRYPTO = "fh.crypto"
CENSUS = "fh.census"
CONFIG = "config"  # Flower FedAvg's ConfigRecord name, which our instructions share
METRICS = "metrics"  # Flower FedAvg's MetricRecord name, which our replies share
ARRAYS = "arrays"  # Flower FedAvg's ArrayRecord name (plaintext runs)

# ---------------------------------------------------------------- field names
SERVER_ROUND = "server-round"
WEIGHT_SUM = "weight-sum"
SITE_WEIGHT = "site-weight"
LAYOUT_HASH = "layout-hash"
FINGERPRINT = "key-fingerprint"
TRAINING_ID = "training-id"
NONCE = "nonce"
GLOBAL_ROUND = "global-round"  # instruction: the round whose replies `fh.global` sums (0: none)
SIGNATURE = "signature"  # reply: the site's ECDSA signature (fedhealth.core.crypto.signing)
REFUSED_GLOBAL = "refused-global"  # reply: a global round whose check values failed at the site
SITE = "site"
NUM_EXAMPLES = "num-examples"

# ---------------------------------------------------------------- file names
SITE_KEY_FILE = "site.ctx"  # the federation's secret CKKS context (sites only, mode 0600)
AGGREGATOR_KEY_FILE = "aggregator.ctx"  # its params-only context (the aggregator)
LABELS_FILE = "labels.csv"  # a site folder's label manifest
LABELS_SPLIT_COLUMN = "split"  # its optional column fixing a study's split (else the site deals it)
SPLITS = ("train", "val", "test")  # the splits a site holds, and the values that column takes
RESULTS_FILE = "results.json"  # what a run leaves in its out-dir
CHECKPOINT_DIR = "checkpoint"  # under the out-dir
CHECKPOINT_FILE = "encrypted_global.npz"  # in the checkpoint folder: E(global) and its metadata
HISTORY_FILE = "site_metrics.json"  # beside it: the run history so far (plaintext metrics only)

CIPHERTEXT_STYPE = "fedhealth.ckks"
"""Flower `Array.stype` of a ciphertext: `data` holds the serialized CKKSVector itself."""


def ciphertext_name(index: int) -> str:
    """`ct-00000`, `ct-00001`, ...: the name of ciphertext `index` in an ArrayRecord or checkpoint."""
    return f"ct-{index:05d}"


def ciphertexts_to_record(blobs: list[bytes]) -> "ArrayRecord":
    """Serialized ciphertexts as Arrays; Flower chunks large arrays itself."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({ciphertext_name(i): Array(dtype="uint8", shape=(len(b),),
                                                  stype=CIPHERTEXT_STYPE, data=bytes(b))
                        for i, b in enumerate(blobs)})


def ciphertext_arrays(record: "ArrayRecord") -> "list[Array]":
    """The record's ciphertext Arrays in order, checked by what they declare, before any parsing.

    Refuses foreign names, gaps, another stype and an Array whose declared shape is not its
    byte count: a reply's size is then known before a byte of it is parsed.
    """
    expected = [ciphertext_name(i) for i in range(len(record))]
    if sorted(record.keys()) != expected:
        raise ValueError(f"ciphertext names must be {ciphertext_name(0)} .. without gaps, got "
                         f"{sorted(record.keys())[:3]}...")
    arrays = [record[name] for name in expected]
    for name, array in zip(expected, arrays, strict=True):
        if (array.stype != CIPHERTEXT_STYPE or array.dtype != "uint8"
                or tuple(array.shape) != (len(array.data),) or not array.data):
            raise ValueError(f"{name} must be a non-empty '{CIPHERTEXT_STYPE}' uint8 Array whose "
                             f"shape is its byte count, got stype {array.stype!r}, dtype "
                             f"{array.dtype!r}, shape {tuple(array.shape)}, "
                             f"{len(array.data)} bytes")
    return arrays


def record_to_ciphertexts(record: "ArrayRecord") -> list[bytes]:
    """The inverse of `ciphertexts_to_record` (see `ciphertext_arrays` for what it refuses)."""
    return [array.data for array in ciphertext_arrays(record)]


def chunk_sizes(size: int, per_ciphertext: int) -> list[int]:
    """How many values each ciphertext of a `size`-value vector holds (all full but the last)."""
    full, rest = divmod(size, per_ciphertext)
    return [per_ciphertext] * full + ([rest] if rest else [])

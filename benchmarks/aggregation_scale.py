"""Encrypted aggregation at real model sizes: the real strategy over N site replies, per preset.

    OMP_NUM_THREADS=1 python benchmarks/aggregation_scale.py --json OUT.json

For each model size (the zoo's models by their parameter count, and a 62M-parameter one, the
size of SwinUNETR) and each preset, sites encrypt `--distinct` different updates
(`encrypt_update`, the site codec with its worker processes); the ServerApp is then a fresh
subprocess per configuration, so its peak RSS (`getrusage` of itself, plus its aggregator
workers sampled with psutil) is that configuration's alone. In it the real `EncryptedFedAvg`
configures a round and folds N replies (`aggregate_train`, uniform a_k, checkpoint written)
that a stand-in SuperLink serves from disk: each pull reads one reply's ciphertexts into new
bytes, as a network delivery would, so a reply's bytes only exist in the ServerApp once pulled.
`streamed` pulls them one by one (`StreamingGrid`, what `EncryptedFedAvg.start` uses);
`batch` is Flower's `send_and_receive`, every reply in memory before the fold (not run at 62M:
20 GB). A site then decrypts the sum (`decrypt_global`) and it is checked against numpy's
mean of what was encrypted. The plaintext row runs `CheckedFedAvg` (Flower's batch path,
float32 arrays) the same way.

Round ratio: one round of encrypted against plaintext FedAvg at DenseNet121 2D size, training
included: a site trains DenseNet121 (`train_centrally`, 1 epoch, 64 px, the run's batch size) on
`--train-images` synthetic images, then the encrypted round adds encrypt, the ServerApp's fold
of the replies and the next round's decrypt, the plaintext round the plaintext fold. Sites
train in parallel on their own machines, so a round is one site's work plus the ServerApp's.
Transfer time is left out of both (the replies come from local disk).

Where replies wait in a deployment: at the SuperLink (LinkState and object store), from when a
site sends one until the ServerApp pulls it; this benchmark's stand-in keeps them on disk.
`--superlink-replies 2,10` measures the SuperLink's object store holding that many replies
(`store_at_superlink`): in memory, as in simulation, and in SQLite, as a deployment runs it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ZOO_PARAMS = {"tiny": 23_877, "segresnet-3d": 178_201, "unet": 403_930,
              "densenet121": 7_033_403, "densenet121-3d": 11_328_443,
              "swinunetr-size": 62_000_000}
"""State-dict sizes of `fedhealth.core.models.ZOO` (checked against the zoo at start), and
the 62M parameters of MONAI's SwinUNETR (feature size 48), which the zoo does not build."""
TRAINING_ID = "aggregation-scale"  # what the sites bind their check values to
UPDATE_SCALE = 0.05  # the spread of the synthetic weights (a trained network's are this small)


@dataclass(frozen=True)
class Config:
    """One ServerApp run: `preset` ("plaintext" for CheckedFedAvg) over `sites` replies."""

    preset: str
    params: int
    sites: int
    mode: str  # "streamed" or "batch"
    workers: int
    data: str  # the folder the sites wrote their replies and key files to


# ---------------------------------------------------------------- site side (parent process)
def site_updates(params: int, distinct: int) -> list[np.ndarray]:
    rng = np.random.default_rng(params)
    return [rng.normal(0, UPDATE_SCALE, size=params).astype(np.float32) for _ in range(distinct)]


def encrypt_replies(folder: Path, preset: str, updates: list[np.ndarray], weight: float,
                    repeat: int) -> float:
    """Keys for `preset`, and each update encrypted `repeat` times at a_k = `weight` to
    `folder`; the fastest encryption's seconds."""
    from fedhealth.core.crypto.codec import RoundBinding, encrypt_update
    from fedhealth.core.crypto.keys import init_key_files, load_site_context
    from fedhealth.core.crypto.wire import record_to_ciphertexts

    init_key_files(folder, preset)
    key = load_site_context(folder / "site.ctx")
    seconds = []
    for index, update in enumerate(updates):
        for _ in range(repeat):
            started = time.perf_counter()
            record = encrypt_update(key, {"w": update}, weight,
                                    binding=RoundBinding(TRAINING_ID, 1))
            seconds.append(time.perf_counter() - started)
        write_blobs(folder / f"update-{index}.bin", record_to_ciphertexts(record))
        del record
    return min(seconds)


def write_blobs(path: Path, blobs: list[bytes]) -> None:
    sizes = np.asarray([len(b) for b in blobs], dtype=np.int64)
    with open(path, "wb") as handle:
        handle.write(len(blobs).to_bytes(8, "little"))
        handle.write(sizes.tobytes())
        for blob in blobs:
            handle.write(blob)


def read_blobs(path: Path) -> list[bytes]:
    """A reply's ciphertexts as new bytes objects (what a pull from the SuperLink hands over)."""
    with open(path, "rb") as handle:
        count = int.from_bytes(handle.read(8), "little")
        sizes = np.frombuffer(handle.read(8 * count), dtype=np.int64)
        return [handle.read(int(size)) for size in sizes]


def decrypt_sum(folder: Path, updates: list[np.ndarray], sites: int, weight: float
                ) -> tuple[float, float]:
    """Seconds for a site to decrypt the sum the ServerApp wrote, and its largest error
    against numpy's mean of what the sites encrypted (NaN when the site refuses the sum: the
    refusal is printed)."""
    from fedhealth.core.crypto.codec import IntegrityError, RoundBinding, decrypt_global
    from fedhealth.core.crypto.keys import load_site_context
    from fedhealth.core.crypto.layout import TensorLayout
    from fedhealth.core.crypto.wire import ciphertexts_to_record

    key = load_site_context(folder / "site.ctx")
    record = ciphertexts_to_record(read_blobs(folder / "sum.bin"))
    started = time.perf_counter()
    try:
        mean = decrypt_global(key, record, TensorLayout.of({"w": updates[0]}), sites * weight,
                              binding=RoundBinding(TRAINING_ID, 1))["w"]
    except IntegrityError as exc:
        print(f"a site refused the sum of {sites} updates: {exc}", flush=True)
        return time.perf_counter() - started, float("nan")
    seconds = time.perf_counter() - started
    expected = np.mean([updates[k % len(updates)].astype(np.float64) for k in range(sites)],
                       axis=0)
    return seconds, float(np.max(np.abs(mean.astype(np.float64) - expected)))


def training_seconds(images: int) -> float:
    """One local epoch of DenseNet121 2D at 64 px on `images` synthetic images, on as many
    threads as the site's codec has processes (every core: a site trains and encrypts alone)."""
    import torch

    from fedhealth.core.crypto.chunk_pool import default_workers
    from sites.training import TrainSettings, train_centrally

    torch.set_num_threads(default_workers())
    generator = torch.Generator().manual_seed(0)
    dataset = [{"image": torch.rand(1, 64, 64, generator=generator), "label": k % 2}
               for k in range(images)]
    started = time.perf_counter()
    train_centrally("densenet121", dataset, TrainSettings(image_size=64, device="cpu"),  # type: ignore[arg-type]
                    num_classes=2, seed=0, epochs=1)
    return time.perf_counter() - started


# ------------------------------------------------------------- ServerApp side (subprocess)
class DiskSuperLink:
    """A stand-in SuperLink for one round: each node's reply is read from disk when pulled."""

    def __init__(self, config: Config, fingerprint: str, layout_hash: str) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.layout_hash = layout_hash
        self.pushed: dict[str, object] = {}
        self.read_seconds = 0.0

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.config.sites + 1))

    def push_messages(self, messages: Iterable[object]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex  # type: ignore[attr-defined]
            self.pushed[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[object]:
        return [self._reply(self.pushed.pop(i)) for i in message_ids if i in self.pushed]

    def send_and_receive(self, messages: Iterable[object], *, timeout: float | None = None
                         ) -> list[object]:
        return self.pull_messages(self.push_messages(messages))

    def _reply(self, instruction: Any) -> object:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        from fedhealth.core.crypto import wire

        node = instruction.metadata.dst_node_id
        started = time.perf_counter()
        path = Path(self.config.data) / f"update-{(node - 1) % distinct_updates(self.config)}.bin"
        crypto = ConfigRecord({wire.SITE: f"site-{node}"})
        if self.config.preset == "plaintext":
            arrays = ArrayRecord({"w": Array(np.fromfile(path, dtype=np.float32))})
            content = RecordDict({wire.ARRAYS: arrays})
        else:
            site_weight = instruction.content.config_records[wire.CRYPTO][wire.SITE_WEIGHT]
            crypto.update({wire.FINGERPRINT: self.fingerprint,
                           wire.LAYOUT_HASH: self.layout_hash, wire.SITE_WEIGHT: site_weight})
            content = RecordDict({wire.UPDATE: wire.ciphertexts_to_record(read_blobs(path))})
        content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 10, "loss": 1.0})
        content[wire.CRYPTO] = crypto
        self.read_seconds += time.perf_counter() - started
        return Message(content, reply_to=instruction)


def distinct_updates(config: Config) -> int:
    return len(list(Path(config.data).glob("update-*.bin")))


def own_peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike getrusage's ru_maxrss, which Linux
    carries over from the parent at fork, it starts afresh with the new program)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024


class PeakRss:
    """The largest RSS of this process plus its children (the aggregator's workers), sampled
    every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children())
            except psutil.Error:
                continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def serve(config: Config) -> dict[str, float]:
    """One round of the real strategy over `config.sites` replies; its figures."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.core.crypto.layout import TensorLayout
    from strategies.reply_stream import StreamingGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    checkpoint = Path(config.data) / f"checkpoint-{os.getpid()}"
    nodes: dict[str, Any] = {"min_train_nodes": config.sites,
                             "min_available_nodes": config.sites,
                             "min_evaluate_nodes": config.sites}
    strategy: Any
    if config.preset == "plaintext":
        from strategies.plaintext_fedavg import CheckedFedAvg
        strategy = CheckedFedAvg(uniform_weights=True, **nodes)
        link = DiskSuperLink(config, "", "")
    else:
        from fedhealth.core.crypto.aggregator_key import load_aggregator_context
        from strategies.encrypted_fedavg import EncryptedFedAvg
        key = load_aggregator_context(Path(config.data) / "aggregator.ctx")
        strategy = EncryptedFedAvg(key, uniform_weights=True, min_replies=config.sites,
                                   workers=config.workers, checkpoint_dir=checkpoint, **nodes)
        layout = TensorLayout.of({"w": np.zeros(config.params, dtype=np.float32)}).hash
        link = DiskSuperLink(config, key.fingerprint, layout)
    if config.preset != "plaintext":
        strategy.start_workers()  # once per run, before round 1, as `start` does
    me = psutil.Process()
    baseline = me.memory_info().rss + sum(c.memory_info().rss for c in me.children())
    sampler = PeakRss()
    started = time.perf_counter()
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), link)
    replies: Iterator[object] | list[object] = (
        StreamingGrid(link).send_and_receive(messages) if config.mode == "streamed"  # type: ignore[arg-type]
        else link.send_and_receive(messages))
    arrays, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - started
    if config.preset != "plaintext":
        strategy.close()
    peak = max(sampler.stop(), own_peak_rss())
    assert arrays is not None, "the round must produce a new global"
    checkpoint_s = 0.0
    if config.preset != "plaintext":
        from strategies.checkpoint import EncryptedGlobal, save_checkpoint
        state: EncryptedGlobal = strategy.current
        started = time.perf_counter()
        save_checkpoint(checkpoint, state)  # again, to say how much of the round it took
        checkpoint_s = time.perf_counter() - started
        write_blobs(Path(config.data) / "sum.bin", state.ciphertexts)
    return {"aggregate_s": seconds - link.read_seconds, "read_s": link.read_seconds,
            "checkpoint_s": checkpoint_s, "peak_rss_mb": peak / 1e6,
            "baseline_rss_mb": baseline / 1e6}


def store_at_superlink(folder: str, database: str, replies: int) -> dict[str, float]:
    """RSS growth of a SuperLink object store holding `replies` train replies not yet pulled.

    Each reply is a Flower Message of the sites' ciphertexts (made distinct: the store is
    content-addressed), put the way the SuperLink stores a SuperNode's push: `preregister`
    of its object tree, then `put` of every object. `database`: Flower's in-memory name
    (`flower-superlink` without `--database`, as in simulation) or a file (SQLite on disk, as
    `fedhealth federation start` runs it).
    """
    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity

    from fedhealth.core.crypto import wire

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    store = ObjectStoreFactory(database).store()
    blobs = read_blobs(Path(folder) / "update-0.bin")
    me = psutil.Process()
    baseline = me.memory_info().rss
    for reply in range(replies):
        distinct = [reply.to_bytes(8, "little") + blob[8:] for blob in blobs]
        message = Message(RecordDict({wire.UPDATE: wire.ciphertexts_to_record(distinct)}),
                          dst_node_id=0, message_type="train")
        store.preregister(1, get_object_tree(message))
        for object_id, item in get_all_nested_objects(message).items():
            store.put(object_id, item.deflate())
        del message, distinct
    return {"growth_mb": (me.memory_info().rss - baseline) / 1e6,
            "update_mb": sum(len(b) for b in blobs) / 1e6}


def superlink_rows(folder: Path, counts: list[int]) -> list[str]:
    """`store_at_superlink` in a fresh process per store and count."""
    lines = []
    for database, where in ((":flwr-in-memory:", "in memory (simulation)"),
                            (str(folder / "superlink.db"), "SQLite file (deployment)")):
        for count in counts:
            done = subprocess.run([sys.executable, __file__, "--store", json.dumps(
                [str(folder), database, count])], capture_output=True, text=True, check=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
            Path(folder / "superlink.db").unlink(missing_ok=True)
            lines.append(f"| {where} | {count} | {found['update_mb']:.1f} | "
                         f"{found['growth_mb']:.0f} |")
    return lines


# ---------------------------------------------------------------- driver
def run_server(config: Config) -> dict[str, float]:
    """`serve(config)` in a fresh Python process (its own peak RSS)."""
    done = subprocess.run([sys.executable, __file__, "--serve", json.dumps(asdict(config))],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"ServerApp run {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    model: str
    params: int
    preset: str
    sites: int
    mode: str
    workers: int
    bytes_per_param: float
    update_mb: float
    encrypt_s: float
    aggregate_s: float
    checkpoint_s: float
    peak_rss_mb: float
    baseline_rss_mb: float
    decrypt_s: float
    max_abs_error: float


def measure_model(model: str, params: int, presets: list[str], site_counts: list[int],
                  workers: list[int], batch: bool, distinct: int, work: Path,
                  superlink: list[int], repeat: int) -> list[Row]:
    """Every configuration of `model` run `repeat` times: the fastest seconds of each step
    count (a shared machine's neighbours only ever slow a run down), and the largest growth
    of peak RSS."""
    updates = site_updates(params, distinct)
    weight = 1.0 / max(site_counts)  # every site's a_k: the sum stays within s <= 1
    rows = []
    for preset in presets:
        folder = Path(tempfile.mkdtemp(dir=work, prefix=f"{model}-{preset}-"))
        if preset == "plaintext":
            for index, update in enumerate(updates):
                update.tofile(folder / f"update-{index}.bin")
            encrypt_s, update_bytes = 0.0, params * 4
        else:
            encrypt_s = encrypt_replies(folder, preset, updates, weight, repeat)
            update_bytes = (folder / "update-0.bin").stat().st_size
        for sites in site_counts:
            modes = ["streamed", "batch"] if batch and preset != "plaintext" else ["streamed"]
            for mode in modes:
                parallel = mode == "streamed" and preset != "plaintext" and sites == max(site_counts)
                for count in (workers if parallel else [1]):
                    config = Config(preset, params, sites, mode, count, str(folder))
                    runs = [run_server(config) for _ in range(repeat)]
                    served = min(runs, key=lambda run: run["aggregate_s"])
                    rss = max(runs, key=lambda run: run["peak_rss_mb"] - run["baseline_rss_mb"])
                    decrypt_s, error = ((0.0, 0.0) if preset == "plaintext" else min(
                        decrypt_sum(folder, updates, sites, weight) for _ in range(repeat)))
                    row = Row(model, params, preset, sites, mode if preset != "plaintext"
                              else "batch", count, update_bytes / params, update_bytes / 1e6,
                              encrypt_s, served["aggregate_s"], served["checkpoint_s"],
                              rss["peak_rss_mb"], rss["baseline_rss_mb"], decrypt_s, error)
                    print(format_row(row), flush=True)
                    rows.append(row)
        if superlink and preset == presets[0]:
            print(f"\nSuperLink object store, {model} {preset} replies waiting to be pulled:\n"
                  "| store | replies | update MB | RSS growth MB |\n|---|---|---|---|\n"
                  + "\n".join(superlink_rows(folder, superlink)) + "\n", flush=True)
        for path in folder.glob("*.bin"):
            path.unlink()
    return rows


HEADER = ("| model | params | preset | sites | mode | agg. workers | B/param | update MB | "
          "site encrypt s | aggregator s/round (checkpoint) | ServerApp peak RSS MB (growth) | "
          "growth / update | decrypt s | max abs error |\n|" + "---|" * 14)


def format_row(row: Row) -> str:
    growth = row.peak_rss_mb - row.baseline_rss_mb
    return (f"| {row.model} | {row.params / 1e6:.2f}M | {row.preset} | {row.sites} | {row.mode} "
            f"| {row.workers} | {row.bytes_per_param:.2f} | {row.update_mb:.1f} | "
            f"{row.encrypt_s:.2f} | {row.aggregate_s:.2f} ({row.checkpoint_s:.2f}) | "
            f"{row.peak_rss_mb:.0f} "
            f"({growth:+.0f}) | {growth / row.update_mb:.2f} | {row.decrypt_s:.2f} | "
            f"{row.max_abs_error:.1e} |")


def round_ratios(rows: list[Row], train_images: list[int], sites: int, repeat: int
                 ) -> list[str]:
    """Encrypted / plaintext round at DenseNet121 2D size, training included (see module); the
    fastest of `repeat` trainings."""
    at_size = [r for r in rows if r.model == "densenet121" and r.sites == sites
               and (r.mode == "streamed" or r.preset == "plaintext")]
    plain = next(r for r in at_size if r.preset == "plaintext")
    lines = []
    for images in train_images:
        train = min(training_seconds(images) for _ in range(repeat))
        for row in at_size:
            if row.preset == "plaintext" or row.workers != max(r.workers for r in at_size):
                continue
            encrypted = train + row.encrypt_s + row.aggregate_s + row.decrypt_s
            plaintext = train + plain.aggregate_s
            lines.append(f"| {images} | {train:.1f} | {row.preset} | {sites} | "
                         f"{encrypted:.1f} | {plaintext:.1f} | {encrypted / plaintext:.2f} |")
    return lines


def check_zoo() -> None:
    from fedhealth.core.models import MODEL_NAMES, build_model

    for name in MODEL_NAMES:
        if name in ZOO_PARAMS:
            size = sum(t.numel() for t in build_model(name, image_size=64).state_dict().values())
            if size != ZOO_PARAMS[name]:
                raise SystemExit(f"the zoo's {name} has {size} parameters, this benchmark says "
                                 f"{ZOO_PARAMS[name]}: update ZOO_PARAMS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(ZOO_PARAMS))
    parser.add_argument("--presets", default="default,compact,packed")
    parser.add_argument("--scale-models", default="densenet121,swinunetr-size",
                        help="models run at every --sites count (the others at the first)")
    parser.add_argument("--sites", default="5,10,20")
    parser.add_argument("--workers", default="1,2",
                        help="aggregator worker processes, tried at the largest site count")
    parser.add_argument("--large-presets", default="default,packed",
                        help="the presets for models above 20M parameters (memory: ~4 GB)")
    parser.add_argument("--batch-models", default="densenet121",
                        help="models also run with Flower's batch send_and_receive")
    parser.add_argument("--train-images", default="36,500")
    parser.add_argument("--distinct", type=int, default=2, help="different updates encrypted")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every timed step (encryption, ServerApp round, decryption, "
                             "training); the fastest counts, and the largest RSS growth")
    parser.add_argument("--plaintext-max-params", type=int, default=12_000_000,
                        help="largest model the plaintext row runs for: CheckedFedAvg holds "
                             "every reply and its float64 grid terms (5 GB at 62M x 5 sites)")
    parser.add_argument("--superlink-replies", default="",
                        help="also measure the SuperLink's object store holding this many "
                             "replies of each model's first preset, e.g. 2,10")
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(Config(**json.loads(args.serve)))))
        return
    if args.store:
        print(json.dumps(store_at_superlink(*json.loads(args.store))))
        return
    check_zoo()
    workers_first = sorted(int(w) for w in args.workers.split(","))
    site_counts = [int(s) for s in args.sites.split(",")]
    workers = workers_first
    presets = args.presets.split(",")
    rows: list[Row] = []
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores")
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="aggregation-scale-") as work:
        for model in args.models.split(","):
            scaled = model in args.scale_models.split(",")
            plaintext = ["plaintext"] if ZOO_PARAMS[model] <= args.plaintext_max_params else []
            chosen = args.large_presets.split(",") if ZOO_PARAMS[model] > 20_000_000 else presets
            rows += measure_model(model, ZOO_PARAMS[model], [*chosen, *plaintext],
                                  site_counts if scaled else site_counts[:1],
                                  workers if scaled else [1],
                                  model in args.batch_models.split(","), args.distinct,
                                  Path(work), [int(n) for n in args.superlink_replies.split(",")
                                               if n], args.repeat)
    ratios = []
    if "densenet121" in args.models.split(","):
        print("\n| training images | train s | preset | sites | encrypted round s | "
              "plaintext round s | ratio |\n|---|---|---|---|---|---|---|")
        ratios = round_ratios(rows, [int(n) for n in args.train_images.split(",")],
                              site_counts[0], args.repeat)
        print("\n".join(ratios))
    print(f"load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios,
                                         "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

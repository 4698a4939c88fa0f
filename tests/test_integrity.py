"""Integrity of the encrypted sum, signed replies, key files and checkpoints (issue 11, items 2-3).

Real TenSEAL ciphertexts and real ECDSA keys throughout. The sites here are the real site code
(`sites.exchange.EncryptedExchange`: decrypt, verify check values, refuse and fall back, sign);
the aggregator is the real `EncryptedFedAvg`, with or without the signature hook, so each layer
is shown on its own: signatures refuse at the aggregator, check values detect at the sites.
"""

import dataclasses
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from strategy_harness import FakeGrid, random_tensors

from fedhealth.core.crypto import wire
from fedhealth.core.crypto.codec import (
    CHECK_TOLERANCE,
    IntegrityError,
    RoundBinding,
    decrypt_global,
    encrypt_update,
)
from fedhealth.core.crypto.keyfile import KeyFileError
from fedhealth.core.crypto.keys import (
    SigningKey,
    SiteKey,
    init_key_files,
    load_aggregator_context,
    load_site_context,
)
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import read_instruction
from fedhealth.core.crypto.signing import ReplyFacts, ReplyVerifier, ciphertext_digest
from fedhealth.core.file_checksum import with_checksum
from fedhealth.core.secret_file import write_secret
from sites.exchange import EncryptedExchange, census_reply
from sites.personal_store import ACCEPTED_GLOBAL, PersonalStore
from sites.site_settings import SiteSettings
from strategies.checkpoint import CheckpointDamaged, EncryptedGlobal, load_checkpoint, save_checkpoint
from strategies.ciphertext_sum import parse_ciphertexts
from strategies.encrypted_fedavg import EncryptedFedAvg
from strategies.reply_signature import signature_hook

SITES = ("h1", "h2", "h3", "bad")
Tamper = Callable[["Site", RecordDict, EncryptedExchange], None]


@pytest.fixture(scope="module")
def fed_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fed")
    init_key_files(directory, sites=SITES)
    return directory


@dataclasses.dataclass
class Site:
    """A site running the real exchange; `tamper(site, reply, exchange)` plays a bad one."""

    settings: SiteSettings
    num_examples: int
    target: dict[str, np.ndarray]
    tamper_in: dict[int, Tamper] = dataclasses.field(default_factory=dict)  # round -> tamper
    key: SiteKey | None = None  # another key than the federation's (a foreign or damaged one)
    state: RecordDict = dataclasses.field(default_factory=RecordDict)
    started_from: dict[int, dict[str, np.ndarray] | None] = dataclasses.field(default_factory=dict)
    replies: dict[int, RecordDict] = dataclasses.field(default_factory=dict)
    evaluated: dict[int, tuple[dict[str, np.ndarray] | None, RecordDict]] = dataclasses.field(
        default_factory=dict)  # round -> (the global it evaluated, its evaluate reply)

    @property
    def name(self) -> str:
        return self.settings.name

    def handle(self, message: Message) -> Message:
        content = message.content
        if message.metadata.message_type == MessageType.QUERY:
            return Message(census_reply(content, self.settings, self.num_examples),
                           reply_to=message)
        exchange = EncryptedExchange.read(content, self.settings, self.state)
        if self.key is not None:
            exchange = dataclasses.replace(exchange, key=self.key)
        layout = TensorLayout.of(self.target)
        start = exchange.global_shared(layout)
        round_ = exchange.server_round
        if message.metadata.message_type == MessageType.EVALUATE:
            reply = exchange.evaluate_reply(self.num_examples, {"loss": 1.0}, self.name)
            self.evaluated[round_] = (start, reply)
            return Message(reply, reply_to=message)
        self.started_from[round_] = start
        base = start or {k: np.zeros_like(v) for k, v in self.target.items()}
        trained = {k: (0.5 * base[k] + 0.5 * v).astype(v.dtype) for k, v in self.target.items()}
        reply = exchange.train_reply(trained, self.num_examples, {"loss": 1.0}, self.name)
        if round_ in self.tamper_in:
            self.tamper_in[round_](self, reply, exchange)
        self.replies[round_] = reply
        return Message(reply, reply_to=message)


class InOrderGrid(FakeGrid):
    """Delivers to sites in node order, so `bad` (the last) answers after the others: a copy
    can only be made of a reply that exists."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return super().send_and_receive(sorted(messages, key=lambda m: m.metadata.dst_node_id),
                                        timeout=timeout)


def make_sites(fed_keys: Path, tmp_path: Path, key_file: Path | None = None) -> list[Site]:
    sites = []
    for k, name in enumerate(SITES):
        settings = SiteSettings(name=name, data_dir=tmp_path / name, labels=None,
                                key_file=fed_keys / wire.SITE_KEY_FILE,
                                state_dir=tmp_path / "state" / name,
                                audit_log=tmp_path / name / "audit.jsonl",
                                signing_key=fed_keys / "node-keys" / f"{name}.key")
        sites.append(Site(settings, 20 + 10 * k, random_tensors(k, width=5000)))
    return sites


def run_rounds(fed_keys: Path, sites: list[Site], rounds: int, *, signed: bool,
               **kwargs: object) -> EncryptedFedAvg:
    grid = InOrderGrid(sites)  # type: ignore[arg-type]
    verifier = ReplyVerifier.from_key_dir(fed_keys) if signed else None
    strategy = EncryptedFedAvg(
        load_aggregator_context(fed_keys / wire.AGGREGATOR_KEY_FILE), min_replies=3,
        min_train_nodes=len(sites), min_available_nodes=len(sites), min_evaluate_nodes=len(sites),
        reply_verifier=signature_hook(verifier) if verifier else None, **kwargs)  # type: ignore[arg-type]
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        messages = strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages))
    return strategy


def refused(site: Site, server_round: int) -> int:
    return int(site.replies[server_round][wire.CRYPTO].get(wire.REFUSED_GLOBAL, 0))  # type: ignore[arg-type]


def rejected(strategy: EncryptedFedAvg) -> dict[tuple[int, str | None], str]:
    return {(r.server_round, r.site): r.reason for r in strategy.history.rejections}


def resign(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
    """A hostile but registered site signs whatever its reply now says."""
    instruction = exchange.instruction
    crypto = reply[wire.CRYPTO]
    facts = ReplyFacts(MessageType.TRAIN, instruction.training_id, instruction.server_round,
                       instruction.nonce, site.name,
                       ciphertext_digest(wire.record_to_ciphertexts(reply[wire.UPDATE])),
                       site.num_examples, instruction.site_weight)
    crypto[wire.SIGNATURE] = SigningKey.load(site.settings.signing_key, site.name).sign(facts)


def assert_detected_then_recovered(sites: list[Site], strategy: EncryptedFedAvg,
                                   bad_round: int = 2) -> None:
    """Round `bad_round`'s global is refused by every honest site, which then train from the
    global before it; the next global is accepted."""
    honest = sites[:3]
    for site in honest:
        evaluated, reply = site.evaluated[bad_round]  # the bad global, first seen in evaluate
        assert reply[wire.CRYPTO][wire.REFUSED_GLOBAL] == bad_round and evaluated is not None
        for name, tensor in site.started_from[bad_round].items():  # type: ignore[union-attr]
            np.testing.assert_array_equal(evaluated[name], tensor)
        assert wire.REFUSED_GLOBAL not in site.evaluated[bad_round + 1][1][wire.CRYPTO]
        assert refused(site, bad_round + 1) == bad_round
        before = site.started_from[bad_round]  # the last global it accepted
        assert before is not None and site.started_from[bad_round + 1] is not None
        for name, tensor in before.items():
            np.testing.assert_array_equal(site.started_from[bad_round + 1][name], tensor)
        assert refused(site, bad_round + 2) == 0 and site.started_from[bad_round + 2] is not None
    assert strategy.completed_rounds == bad_round + 2


# ------------------------------------------------------------ check values, at the sites
def test_honest_rounds_pass_their_checks(fed_keys: Path, tmp_path: Path) -> None:
    sites = make_sites(fed_keys, tmp_path)
    strategy = run_rounds(fed_keys, sites, 3, signed=True)
    assert not strategy.history.rejections
    assert all(refused(s, r) == 0 for s in sites for r in (1, 2, 3))
    stored = PersonalStore(None, sites[0].settings.state_dir, run_key=strategy.training_id,
                           site="h1", kind=ACCEPTED_GLOBAL).load()
    assert stored is not None  # the last accepted global, on disk under the training id
    last = sites[0].evaluated[3][0]  # round 3's global, decrypted for round 3's evaluation
    assert last is not None
    np.testing.assert_array_equal(stored["body.weight"], last["body.weight"])


def test_foreign_key_with_our_fingerprint_is_detected(fed_keys: Path, tmp_path: Path) -> None:
    init_key_files(tmp_path / "other")
    other = load_site_context(tmp_path / "other" / wire.SITE_KEY_FILE)
    ours = load_site_context(fed_keys / wire.SITE_KEY_FILE)
    sites = make_sites(fed_keys, tmp_path)
    foreign = dataclasses.replace(other, fingerprint=ours.fingerprint)
    bad = sites[3]

    def foreign_update(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        reply[wire.UPDATE] = encrypt_update(foreign, site.target, exchange.instruction.site_weight,
                                            binding=exchange.instruction.binding)
        resign(site, reply, exchange)  # a registered site with a wrong site.ctx signs what it sends
    bad.tamper_in[2] = foreign_update
    strategy = run_rounds(fed_keys, sites, 4, signed=True)
    assert not strategy.history.rejections  # the aggregator cannot tell: same fingerprint
    assert_detected_then_recovered(sites, strategy)


def test_inflated_site_weight_is_detected(fed_keys: Path, tmp_path: Path) -> None:
    sites = make_sites(fed_keys, tmp_path)

    def times_100(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        bigger = dataclasses.replace(exchange.instruction,
                                     site_weight=100 * exchange.instruction.site_weight)
        reply[wire.UPDATE] = encrypt_update(site.key or exchange.key, site.target,
                                            bigger.site_weight, binding=bigger.binding,
                                            weight_sum_bound=100.0)
        resign(site, reply, exchange)  # it states (and signs) the a_k it was sent
    sites[3].tamper_in[2] = times_100
    strategy = run_rounds(fed_keys, sites, 4, signed=True)
    assert not strategy.history.rejections  # well-formed and signed: only the sum can tell
    assert_detected_then_recovered(sites, strategy)


def test_stale_round_one_ciphertexts_are_detected_at_sites(fed_keys: Path, tmp_path: Path) -> None:
    """Without signatures the replay reaches the sum; its round-1 check values give it away."""
    sites = make_sites(fed_keys, tmp_path)

    def replay(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        reply[wire.UPDATE] = sites[0].replies[1][wire.UPDATE]
    sites[3].tamper_in[2] = replay
    strategy = run_rounds(fed_keys, sites, 4, signed=False)
    assert_detected_then_recovered(sites, strategy)


def test_unsigned_bit_flip_in_an_update_is_detected_at_sites(fed_keys: Path,
                                                            tmp_path: Path) -> None:
    """A flip the aggregator's parsing cannot see (in a coefficient) reaches the sum unsigned;
    every honest site refuses that global and the next round recovers."""
    sites = make_sites(fed_keys, tmp_path)

    def flip_bit(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        blobs = wire.record_to_ciphertexts(reply[wire.UPDATE])
        middle = len(blobs[0]) // 2
        blobs[0] = blobs[0][:middle] + bytes([blobs[0][middle] ^ 0x04]) + blobs[0][middle + 1:]
        reply[wire.UPDATE] = wire.ciphertexts_to_record(blobs)
    sites[3].tamper_in[2] = flip_bit
    strategy = run_rounds(fed_keys, sites, 4, signed=False)
    assert not strategy.history.rejections  # parses, right size, scale and level: summed
    assert_detected_then_recovered(sites, strategy)


def test_every_single_bit_flip_is_refused_or_detected(fed_keys: Path) -> None:
    """40 random single-bit flips in a 2-site sum: each is refused when parsed, or fails the
    check values (ciphertexts are in NTT form: one bit scrambles the whole polynomial). An
    undetected flip would have to move no value by more than the check tolerance."""
    key = load_site_context(fed_keys / wire.SITE_KEY_FILE)
    aggregator = load_aggregator_context(fed_keys / wire.AGGREGATOR_KEY_FILE)
    tensors = random_tensors(1, width=3000)
    layout, binding = TensorLayout.of(tensors), RoundBinding("t", 1)
    parts = [parse_ciphertexts(aggregator, wire.record_to_ciphertexts(
        encrypt_update(key, tensors, 0.5, binding=binding))) for _ in range(2)]
    for acc, vector in zip(*parts, strict=True):
        acc.add_(vector)
    blob = parts[0][0].serialize()
    clean = decrypt_global(key, wire.ciphertexts_to_record([blob]), layout, 1.0, binding=binding)
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "detected": 0, "harmless": 0}
    for bit in rng.choice(len(blob) * 8, size=40, replace=False):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            got = decrypt_global(key, wire.ciphertexts_to_record([bytes(flipped)]), layout, 1.0,
                                 binding=binding)
        except IntegrityError:
            outcomes["detected"] += 1
            continue
        except (ValueError, RuntimeError, TypeError):
            outcomes["refused"] += 1
            continue
        outcomes["harmless"] += 1
        for name in tensors:
            assert np.max(np.abs(got[name] - clean[name])) <= 2 * CHECK_TOLERANCE, bit
    assert outcomes["harmless"] == 0 and outcomes["detected"] > 30, outcomes


# ------------------------------------------------------------ signatures, at the aggregator
def test_replay_of_another_sites_round_one_update_is_refused(fed_keys: Path,
                                                             tmp_path: Path) -> None:
    sites = make_sites(fed_keys, tmp_path)

    def replay(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        reply[wire.UPDATE] = sites[0].replies[1][wire.UPDATE]
        resign(site, reply, exchange)
    sites[3].tamper_in[2] = replay
    strategy = run_rounds(fed_keys, sites, 3, signed=True)
    assert "identical to those h1 sent in round 1" in rejected(strategy)[(2, "bad")]
    assert all(refused(s, 3) == 0 for s in sites[:3])  # never reached the sum


def test_copy_of_another_sites_current_update_is_refused(fed_keys: Path, tmp_path: Path) -> None:
    sites = make_sites(fed_keys, tmp_path)

    def copy(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        reply[wire.UPDATE] = sites[1].replies[2][wire.UPDATE]
        resign(site, reply, exchange)
    sites[3].tamper_in[2] = copy
    strategy = run_rounds(fed_keys, sites, 3, signed=True, uniform_weights=True)
    assert "identical to those h2 sent in round 2" in rejected(strategy)[(2, "bad")]
    assert strategy.completed_rounds == 3 and all(refused(s, 3) == 0 for s in sites[:3])


def test_changed_reply_or_unsigned_or_unregistered_is_refused(fed_keys: Path,
                                                              tmp_path: Path) -> None:
    sites = make_sites(fed_keys, tmp_path)

    def flip_bit(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        blobs = wire.record_to_ciphertexts(reply[wire.UPDATE])
        blobs[0] = blobs[0][:200] + bytes([blobs[0][200] ^ 0x10]) + blobs[0][201:]
        reply[wire.UPDATE] = wire.ciphertexts_to_record(blobs)

    def as_another_site(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        reply[wire.CRYPTO][wire.SITE] = "h9"  # no registered key

    def unsigned(site: Site, reply: RecordDict, exchange: EncryptedExchange) -> None:
        del reply[wire.CRYPTO][wire.SIGNATURE]
    sites[3].tamper_in.update({1: flip_bit, 2: as_another_site, 3: unsigned})
    strategy = run_rounds(fed_keys, sites, 3, signed=True)
    reasons = rejected(strategy)
    assert "content changed after signing" in reasons[(1, "bad")]
    assert "site 'h9' has no registered signing key" in reasons[(2, "bad")]
    assert "no signature" in reasons[(3, "bad")]
    assert strategy.completed_rounds == 3 and all(refused(s, r) == 0 for s in sites[:3]
                                                  for r in (2, 3))


# ------------------------------------------------------------ key files
def test_every_single_bit_flip_in_site_ctx_is_refused(fed_keys: Path, tmp_path: Path) -> None:
    raw = (fed_keys / wire.SITE_KEY_FILE).read_bytes()
    rng = np.random.default_rng(1)
    for i, bit in enumerate(rng.choice(len(raw) * 8, size=40, replace=False)):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path = write_secret(tmp_path / f"flip-{i}.ctx", bytes(flipped))
        with pytest.raises(KeyFileError, match=f"flip-{i}.ctx"):
            load_site_context(path)


def test_group_readable_site_ctx_is_refused_on_the_clientapp_path(fed_keys: Path,
                                                                  tmp_path: Path) -> None:
    exposed = tmp_path / "exposed" / wire.SITE_KEY_FILE
    write_secret(exposed, (fed_keys / wire.SITE_KEY_FILE).read_bytes())
    os.chmod(exposed, 0o640)
    site = dataclasses.replace(make_sites(fed_keys, tmp_path)[0].settings, key_file=exposed)
    key = load_site_context(fed_keys / wire.SITE_KEY_FILE)
    instruction = RecordDict({wire.CRYPTO: ConfigRecord({
        wire.SERVER_ROUND: 1, wire.WEIGHT_SUM: 0.0, wire.SITE_WEIGHT: 0.5, wire.LAYOUT_HASH: "",
        wire.FINGERPRINT: key.fingerprint, wire.TRAINING_ID: "t", wire.NONCE: "n"})})
    assert read_instruction(instruction).server_round == 1
    with pytest.raises(KeyFileError, match=r"permissions 0640.*chmod 600"):
        EncryptedExchange.read(instruction, site, None)


def test_secret_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "s.key", b"one")
    with pytest.raises(FileExistsError, match="never replaced by accident"):
        write_secret(path, b"two")
    write_secret(path, b"two", overwrite=True)
    assert path.read_bytes() == b"two" and (path.stat().st_mode & 0o777) == 0o600


# ------------------------------------------------------------ checkpoints
def _checkpoint(tmp_path: Path, key: SiteKey) -> Path:
    blobs = wire.record_to_ciphertexts(encrypt_update(key, random_tensors(0), 1.0))
    save_checkpoint(tmp_path, EncryptedGlobal(3, blobs, 1.0, "a" * 64, (4096,) * len(blobs),
                                              key.fingerprint, "train-1"))
    return tmp_path / wire.CHECKPOINT_FILE


def _rewritten(path: Path, drop: str | None = None, **meta: object) -> None:
    """The checkpoint re-packed with a field changed or an entry dropped, checksum made anew:
    what a buggy writer could leave, which the checksum alone does not catch."""
    import json
    body = path.read_bytes()[:-(len("\nfedhealth-sha256:") + 65)]
    with np.load(io.BytesIO(body)) as data:
        arrays = {n: data[n] for n in data.files if n != drop}
    old = json.loads(arrays["meta"].tobytes())
    arrays["meta"] = np.frombuffer(json.dumps({**old, **meta}).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(with_checksum(buffer.getvalue()))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "bit flip", "missing ct-00000",
                                    "weight sum 0", "weight sum nan", "round as text",
                                    "no checksum"])
def test_damaged_checkpoint_gives_the_one_damaged_error(tmp_path: Path, key_dir: Path,
                                                        site_key: SiteKey, damage: str) -> None:
    path = _checkpoint(tmp_path, site_key)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "bit flip":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    elif damage == "missing ct-00000":
        _rewritten(path, drop="ct-00000")
    elif damage == "weight sum 0":
        _rewritten(path, weight_sum=0.0)
    elif damage == "weight sum nan":
        _rewritten(path, weight_sum=float("nan"))
    elif damage == "round as text":
        _rewritten(path, server_round="3")
    else:
        path.write_bytes(raw[:-(len("\nfedhealth-sha256:") + 65)])
    with pytest.raises(CheckpointDamaged, match=r"checkpoint .*encrypted_global.npz is damaged.*"
                                                r"Restore it .* or move the checkpoint folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointDamaged):  # the same through the strategy, resume = true
        EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                        checkpoint_dir=tmp_path, resume=True)


def test_a_global_that_cannot_be_decrypted_is_refused_like_a_failed_check(
        fed_keys: Path) -> None:
    key = load_site_context(fed_keys / wire.SITE_KEY_FILE)
    tensors = random_tensors(2, width=5000)
    blobs = wire.record_to_ciphertexts(encrypt_update(key, tensors, 1.0))
    damaged = wire.ciphertexts_to_record([blobs[0][:-100]])  # truncated and one missing
    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        decrypt_global(key, damaged, TensorLayout.of(tensors), 1.0)

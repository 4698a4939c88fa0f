"""One broken or hostile site among three honest ones: excluded with a recorded reason, never a crash.

Every case drives the real strategy (EncryptedFedAvg, or CheckedFedAvg for plaintext runs) with
real TenSEAL ciphertexts from the site helpers; the hostile site's reply is rewritten after it is
built. Each asserts the outcome: the site is excluded with a recorded reason, the honest sites'
round completes, and nothing the hostile site sent reaches the record.
"""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from strategy_harness import FakeGrid, FakeSite, PlainSite, Tamper, only, random_tensors

from fedhealth.core import fixed_point
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import load_aggregator_context
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.seal_bytes import SealSink, vector_bytes
from fedhealth.core.run_history import RunResults, write_json_atomically
from strategies.encrypted_fedavg import EncryptedFedAvg
from strategies.plaintext_fedavg import CheckedFedAvg
from strategies.reply_check import MAX_NUM_EXAMPLES, CheckedReply, ReplyRejected

Edit = Callable[[RecordDict], RecordDict | None]


def encrypted_strategy(key_dir: Path, **kwargs: object) -> EncryptedFedAvg:
    return EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                           min_train_nodes=4, min_available_nodes=4, min_evaluate_nodes=4,
                           min_replies=3, **kwargs)  # type: ignore[arg-type]


def federation(site_key: SiteKey, tamper: Tamper | None, *, bad_examples: int = 30,
               site: type[FakeSite] = FakeSite) -> FakeGrid:
    """Three honest sites (nodes 101-103) and one called `bad` (node 104)."""
    honest = [site(f"h{k}", site_key, 20 + k, random_tensors(k)) for k in range(3)]
    return FakeGrid([*honest, site("bad", site_key, bad_examples, random_tensors(3),
                                   tamper=tamper)])


def one_round(strategy: EncryptedFedAvg | CheckedFedAvg, grid: FakeGrid,
              server_round: int = 1) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Train then evaluate, as Flower's loop runs a round; returns (new arrays, evaluate mean)."""
    arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)))
    evaluated = strategy.aggregate_evaluate(server_round, grid.send_and_receive(
        strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)))
    return arrays, evaluated


def reasons(strategy: EncryptedFedAvg | CheckedFedAvg, kind: str) -> list[str]:
    """Recorded reasons for node 104 (`bad`) in replies of `kind`."""
    return [r.reason for r in strategy.history.rejections if r.node_id == 104 and r.kind == kind]


# ---------------------------------------------------------------- edits a hostile site makes
def set_field(record: str, name: str, value: object) -> Edit:
    def edit(content: RecordDict) -> None:
        content[record][name] = value  # type: ignore[index]
    return edit


def delete(record: str, name: str | None = None) -> Edit:
    def edit(content: RecordDict) -> None:
        if name is None:
            del content[record]
        else:
            del content[record][name]  # type: ignore[attr-defined]
    return edit


def add_record(name: str, record: object, *, first: bool = False) -> Edit:
    def edit(content: RecordDict) -> RecordDict:
        items = dict(content.items())
        return RecordDict({name: record, **items} if first else {**items, name: record})
    return edit


def out_of_ntt_form(site_key: SiteKey) -> Edit:
    """The first ciphertext taken out of NTT form: it parses, and SEAL's add_ refuses it."""
    def edit(content: RecordDict) -> None:
        blobs = wire.record_to_ciphertexts(content[wire.UPDATE])  # type: ignore[arg-type]
        vector = ts.ckks_vector_from(site_key.context, blobs[0])
        (ciphertext,) = vector.ciphertext()
        seal.Evaluator(site_key.context.seal_context().data).transform_from_ntt_inplace(ciphertext)
        with SealSink() as sink:
            blobs[0] = vector_bytes(sink.dump(ciphertext), vector.size(), site_key.preset.scale)
        content[wire.UPDATE] = wire.ciphertexts_to_record(blobs)
    return edit


def garbage_npy(content: RecordDict) -> None:
    """The real ciphertext behind a garbage .npy header, in a numpy Array: the old reader sliced
    the bytes off the end (and parsed them), then the run history's `Array.numpy()` crashed."""
    blob = wire.record_to_ciphertexts(content[wire.UPDATE])[0]  # type: ignore[arg-type]
    content[wire.UPDATE] = ArrayRecord({wire.ciphertext_name(0): Array(
        dtype="uint8", shape=(len(blob),), stype="numpy.ndarray",
        data=b"\x93NUMPY\x01\x00garbage" + blob)})


OLD_SITE_RECORD = "site"  # what sites used to send beside fh.crypto: {"name", "server-round"}

# (case, edit, message types it is applied to, what the recorded reason says)
CASES: list[tuple[str, Edit, tuple[str, ...], str]] = [
    ("reply without its site record", delete(wire.CRYPTO), ("train", "evaluate"),
     "missing ConfigRecord 'fh.crypto'"),
    ("site record without its name", delete(wire.CRYPTO, wire.SITE), ("train", "evaluate"),
     "missing field 'site'"),
    ("server-round='abc'", add_record(OLD_SITE_RECORD, ConfigRecord(
        {"name": "bad", "server-round": "abc"})), ("train", "evaluate"),
     "unexpected record 'site'"),
    ("a record naming another round", add_record(OLD_SITE_RECORD, ConfigRecord(
        {"name": "bad", "server-round": 7})), ("train", "evaluate"),
     "unexpected record 'site'"),
    ("list-valued metric", set_field(wire.METRICS, "auc", [0.5, 0.9]), ("train", "evaluate"),
     "metric 'auc' must be a finite number"),
    ("NaN metric", set_field(wire.METRICS, "auc", float("nan")), ("train", "evaluate"),
     "metric 'auc' must be a finite number"),
    ("inf metric", set_field(wire.METRICS, "loss", float("inf")), ("train", "evaluate"),
     "metric 'loss' must be a finite number"),
    ("an extra MetricRecord before metrics", add_record(
        "aaa", MetricRecord({"num-examples": 5}), first=True), ("train", "evaluate"),
     "unexpected record 'aaa'"),
    ("num-examples 1e15", set_field(wire.METRICS, wire.NUM_EXAMPLES, 1e15), ("train", "evaluate"),
     f"'num-examples' must be an int in 1..{MAX_NUM_EXAMPLES}"),
    ("num-examples 0", set_field(wire.METRICS, wire.NUM_EXAMPLES, 0), ("train", "evaluate"),
     f"'num-examples' must be an int in 1..{MAX_NUM_EXAMPLES}"),
    ("a site name with a newline", set_field(wire.CRYPTO, wire.SITE, "h9\nforged"),
     ("train", "evaluate"), "'site' must be 1-64 letters"),
    ("refused-global of a later round", set_field(wire.CRYPTO, wire.REFUSED_GLOBAL, 99),
     ("train", "evaluate"), "'refused-global' must be a round in 0..1"),
    ("site-weight as a string", set_field(wire.CRYPTO, wire.SITE_WEIGHT, "0.5"), ("train",),
     "field 'site-weight' must be a finite float"),
    ("an fh.update array with a garbage .npy header", garbage_npy, ("train",),
     "ct-00000 must be a non-empty 'fedhealth.ckks' uint8 Array"),
]


@pytest.mark.parametrize(("edit", "kinds", "reason"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_reply_is_excluded_and_the_round_completes(
        key_dir: Path, site_key: SiteKey, edit: Edit, kinds: tuple[str, ...], reason: str) -> None:
    strategy = encrypted_strategy(key_dir)
    arrays, evaluated = one_round(strategy, federation(site_key, only(*kinds, edit=edit)))
    assert arrays is not None and evaluated is not None  # the honest sites' round completed
    for kind in kinds:
        [found] = reasons(strategy, kind)
        assert found.startswith(reason), found
        assert set(strategy.history.sites(kind, 1)) == {"h0", "h1", "h2"}
    assert strategy.current is not None and strategy.current.server_round == 1
    assert 7 not in strategy.history.records["train"]  # no round a reply named was recorded


def test_a_refused_global_is_kept_in_the_record(key_dir: Path, site_key: SiteKey) -> None:
    strategy = encrypted_strategy(key_dir)
    grid = federation(site_key, None)
    one_round(strategy, grid)
    grid.sites[104].tamper = only("train", edit=set_field(wire.CRYPTO, wire.REFUSED_GLOBAL, 1))
    one_round(strategy, grid, 2)
    results = RunResults("fedavg", True, 2, 0.0, strategy.history).to_json()
    assert results["refused_globals"] == [
        {"kind": "train", "round": 2, "site": "bad", "refused_global": 1}]


def test_ciphertext_out_of_ntt_form_is_refused_before_it_is_added(
        key_dir: Path, site_key: SiteKey) -> None:
    strategy = encrypted_strategy(key_dir)
    arrays, _ = one_round(strategy, federation(site_key, only(
        "train", edit=out_of_ntt_form(site_key))))
    assert arrays is not None
    [reason] = reasons(strategy, "train")
    assert "is not a fresh 'default' ciphertext" in reason and "NTT form False" in reason
    assert abs(strategy.current.weight_sum - sum(  # type: ignore[union-attr]
        20 + k for k in range(3)) / (sum(20 + k for k in range(3)) + 30)) < 1e-12


def test_reply_naming_another_site_cannot_overwrite_its_record(
        key_dir: Path, site_key: SiteKey) -> None:
    strategy = encrypted_strategy(key_dir)
    one_round(strategy, federation(site_key, only("train", "evaluate", edit=set_field(
        wire.CRYPTO, wire.SITE, "h0"))))
    assert reasons(strategy, "train") == [
        "node 104 answered as site 'bad' before, now names 'h0'"]
    assert len(reasons(strategy, "evaluate")) == 1
    assert strategy.history.sites("train", 1)["h0"].num_examples == 20  # h0's own
    assert strategy.history.sites("evaluate", 1)["h0"].num_examples == 20


def test_a_node_that_first_claims_another_sites_name_is_refused(
        key_dir: Path, site_key: SiteKey) -> None:
    """Uniform weights: no census, so the first name a node states is in its first reply.

    Without signatures the first node to claim a name holds it (here the honest one, whose
    reply arrives first); with a `reply_verifier` a name is only accepted from its own key."""
    strategy = encrypted_strategy(key_dir, uniform_weights=True)
    one_round(strategy, federation(site_key, only("train", "evaluate", edit=set_field(
        wire.CRYPTO, wire.SITE, "h0"))))
    assert reasons(strategy, "train") == ["site 'h0' is node 101; node 104 cannot answer for it"]
    assert strategy.history.sites("train", 1)["h0"].num_examples == 20


@pytest.mark.parametrize("count", [1e15, 10**15, 0, -3])
def test_census_count_out_of_range_sits_the_site_out(key_dir: Path, site_key: SiteKey,
                                                      count: float) -> None:
    strategy = encrypted_strategy(key_dir)
    grid = federation(site_key, only("query", edit=set_field(wire.METRICS, wire.NUM_EXAMPLES,
                                                              count)))
    sent = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in sent) == [101, 102, 103]
    [reason] = reasons(strategy, "census")
    assert reason.startswith("'num-examples' must be an int in 1..")
    weights = [float(m.content[wire.CRYPTO][wire.SITE_WEIGHT]) for m in sent]  # type: ignore[arg-type]
    assert abs(sum(weights) - 1.0) < 1e-12


def test_coordinator_caps_a_site_claiming_a_huge_count(key_dir: Path, site_key: SiteKey) -> None:
    strategy = encrypted_strategy(key_dir, max_site_weight=0.4)
    grid = federation(site_key, None, bad_examples=MAX_NUM_EXAMPLES)
    arrays, _ = one_round(strategy, grid)
    assert arrays is not None
    sent = {node: float(site.seen[0][wire.CRYPTO][wire.SITE_WEIGHT])  # type: ignore[arg-type]
            for node, site in grid.sites.items()}
    assert sent[104] == pytest.approx(0.4)
    honest = np.array([20, 21, 22]) / 63 * 0.6  # the rest, in proportion to the honest counts
    assert [sent[n] for n in (101, 102, 103)] == pytest.approx(list(honest))


def test_lone_evaluate_reply_with_zero_examples(key_dir: Path, site_key: SiteKey) -> None:
    strategy = EncryptedFedAvg(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE),
                               min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1)
    grid = FakeGrid([FakeSite("alone", site_key, 10, random_tensors(0), tamper=only(
        "evaluate", edit=set_field(wire.METRICS, wire.NUM_EXAMPLES, 0)))])
    replies = grid.send_and_receive(
        strategy.configure_evaluate(0, ArrayRecord(), ConfigRecord(), grid))
    assert strategy.aggregate_evaluate(0, replies) is None  # was ZeroDivisionError
    [rejection] = strategy.history.rejections
    assert (rejection.kind, rejection.site) == ("evaluate", None)
    assert rejection.reason.startswith("'num-examples' must be an int in 1..")


class EchoGrid(FakeGrid):
    """Delivers every reply, then the first one again, and one from a node nobody asked."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = super().send_and_receive(messages)
        stranger = Message(RecordDict(), dst_node_id=999, message_type=MessageType.TRAIN)
        return [*replies, replies[0], Message(replies[1].content, reply_to=stranger)]


def test_second_reply_and_unasked_node_are_refused(key_dir: Path, site_key: SiteKey) -> None:
    strategy = encrypted_strategy(key_dir)
    grid = EchoGrid([FakeSite(f"h{k}", site_key, 20 + k, random_tensors(k)) for k in range(4)])
    arrays, _ = one_round(strategy, grid)
    assert arrays is not None
    found = {(r.node_id, r.reason) for r in strategy.history.rejections if r.kind == "train"}
    assert found == {(101, "a second reply from this node in the same round"),
                     (999, "node 999 was not asked for a train reply in round 1")}
    assert len(strategy.history.sites("train", 1)) == 4


def test_every_instruction_carries_a_fresh_nonce_the_verifier_is_given(
        key_dir: Path, site_key: SiteKey) -> None:
    seen: list[CheckedReply] = []

    def verifier(reply: CheckedReply, training_id: str) -> None:
        assert training_id == strategy.training_id
        seen.append(reply)
        if reply.site == "bad" and reply.kind == MessageType.TRAIN:
            raise ReplyRejected("the signature is not bad's")

    strategy = encrypted_strategy(key_dir, reply_verifier=verifier)
    grid = federation(site_key, None)
    one_round(strategy, grid)
    one_round(strategy, grid, 2)
    assert reasons(strategy, "train") == ["the signature is not bad's"] * 2
    assert "bad" not in strategy.history.sites("train", 2)
    nonces = [str(c[wire.CRYPTO][wire.NONCE]) for s in grid.sites.values() for c in s.seen]
    assert len(set(nonces)) == len(nonces) == 16  # 4 sites x 2 rounds x (train, evaluate)
    kinds = {r.kind for r in seen}
    assert kinds == {MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE}
    for reply in seen:  # the nonce handed to the verifier is the one that node was sent
        if reply.kind != MessageType.QUERY:
            instructions = grid.sites[reply.node_id].seen
            assert reply.nonce in {str(c[wire.CRYPTO][wire.NONCE]) for c in instructions}


FIELD_VALUES: list[object] = ["abc", "", -1, 0, 10**18, 1e308, float("nan"), [1.0], b"\x00", True]


def every_field_mutation() -> list[tuple[str, str, str, object]]:
    """(message type, record, field, value) for every field a train or evaluate reply has."""
    fields = {"train": {wire.CRYPTO: [wire.SITE, wire.FINGERPRINT, wire.LAYOUT_HASH,
                                      wire.SITE_WEIGHT],
                        wire.METRICS: [wire.NUM_EXAMPLES, "loss"]},
              "evaluate": {wire.CRYPTO: [wire.SITE, wire.FINGERPRINT],
                           wire.METRICS: [wire.NUM_EXAMPLES, "distance"]}}
    return [(kind, record, name, value) for kind, records in fields.items()
            for record, names in records.items() for name in names for value in FIELD_VALUES
            if not (record == wire.METRICS and isinstance(value, str | bytes | bool))]  # Flower
    # refuses those in a MetricRecord, so they can never arrive


@pytest.mark.parametrize(("kind", "record", "name", "value"), every_field_mutation())
def test_no_field_value_escapes_as_an_exception(key_dir: Path, site_key: SiteKey, kind: str,
                                                record: str, name: str, value: object) -> None:
    strategy = encrypted_strategy(key_dir, uniform_weights=True)
    one_round(strategy, federation(site_key, only(kind, edit=set_field(record, name, value))))
    assert set(strategy.history.sites(kind, 1)) >= {"h0", "h1", "h2"}
    assert len(reasons(strategy, kind)) <= 1


def test_results_json_stays_strict_json(key_dir: Path, site_key: SiteKey, tmp_path: Path) -> None:
    strategy = encrypted_strategy(key_dir)
    one_round(strategy, federation(site_key, only("evaluate", edit=set_field(
        wire.METRICS, "auc", float("nan")))))
    path = tmp_path / wire.RESULTS_FILE
    write_json_atomically(path, RunResults("fedavg", True, 1, 0.0, strategy.history).to_json())

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in results.json")

    results = json.loads(path.read_text(), parse_constant=refuse)
    assert set(results["evaluate_by_round"]["1"]) == {"h0", "h1", "h2"}
    assert [(r["site"], r["kind"]) for r in results["rejected"]] == [("bad", "evaluate")]


# ---------------------------------------------------------------- plaintext runs
PLAINTEXT_CASES = [c for c in CASES if c[0] not in (
    "site-weight as a string", "an fh.update array with a garbage .npy header")]


def garbage_arrays(content: RecordDict) -> None:
    content[wire.ARRAYS] = ArrayRecord({"body.weight": Array(
        dtype="float64", shape=(3000,), stype="numpy.ndarray", data=b"\x93NUMPY\x01\x00garbage")})


def nan_arrays(content: RecordDict) -> None:
    content[wire.ARRAYS] = ArrayRecord({n: Array(np.full_like(t, np.nan))
                                        for n, t in random_tensors(3).items()})


@pytest.mark.parametrize(("edit", "kinds", "reason"), [
    *[c[1:] for c in PLAINTEXT_CASES],
    (garbage_arrays, ("train",), "array 'body.weight' does not parse"),
    (nan_arrays, ("train",), "array 'body.weight' must hold finite numbers"),
], ids=[*(c[0] for c in PLAINTEXT_CASES), "garbage .npy header", "NaN arrays"])
def test_plaintext_fedavg_survives_the_same_replies(
        site_key: SiteKey, edit: Edit, kinds: tuple[str, ...], reason: str) -> None:
    strategy = CheckedFedAvg(min_train_nodes=4, min_available_nodes=4, min_evaluate_nodes=4)
    arrays, evaluated = one_round(strategy, federation(
        site_key, only(*kinds, edit=edit), site=PlainSite))
    assert arrays is not None and evaluated is not None
    for kind in kinds:
        [found] = reasons(strategy, kind)
        assert found.startswith(reason), found
        assert set(strategy.history.sites(kind, 1)) == {"h0", "h1", "h2"}
    expected = np.average([0.5 * random_tensors(k)["body.weight"] for k in range(3)], axis=0,
                          weights=[20, 21, 22])
    # the honest sites' mean, on the grid: 3 terms of at most STEP / 2 each, over s >= 0.6
    assert np.allclose(arrays["body.weight"].numpy(), expected, rtol=0, atol=4 * fixed_point.STEP)


def test_plaintext_lone_evaluate_reply_with_zero_examples(site_key: SiteKey) -> None:
    strategy = CheckedFedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1)
    grid = FakeGrid([PlainSite("alone", site_key, 10, random_tensors(0), tamper=only(
        "evaluate", edit=set_field(wire.METRICS, wire.NUM_EXAMPLES, 0)))])
    replies = grid.send_and_receive(
        strategy.configure_evaluate(0, ArrayRecord(), ConfigRecord(), grid))
    assert strategy.aggregate_evaluate(0, replies) is None
    assert [r.kind for r in strategy.history.rejections] == ["evaluate"]


# ---------------------------------------------------------------- bounded memory
def peak_growth_mb(work: Callable[[], object]) -> float:
    """Growth of this process's peak resident set (VmHWM) while `work` runs, in MB."""
    def status(field: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    work()
    return status("VmHWM:") - before


def thousands_of_ciphertexts(content: RecordDict) -> None:
    """8000 copies of the site's first ciphertext (one bytes object: the message costs nothing)."""
    blob = wire.record_to_ciphertexts(content[wire.UPDATE])[0]  # type: ignore[arg-type]
    content[wire.UPDATE] = wire.ciphertexts_to_record([blob] * 8000)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("server_round", [1, 2])
def test_reply_of_8000_ciphertexts_is_refused_before_parsing(
        key_dir: Path, site_key: SiteKey, server_round: int) -> None:
    """Was 1013 MB of parsed ciphertexts before the layout check refused the reply."""
    strategy = encrypted_strategy(key_dir)
    grid = federation(site_key, None)
    if server_round == 2:
        one_round(strategy, grid)
    grid.sites[104].tamper = only("train", edit=thousands_of_ciphertexts)
    replies = grid.send_and_receive(
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    result: list[ArrayRecord | None] = []
    growth = peak_growth_mb(lambda: result.append(strategy.aggregate_train(server_round,
                                                                           replies)[0]))
    assert growth < 50, f"aggregate_train grew the peak RSS by {growth:.0f} MB"
    assert result[0] is not None and set(strategy.history.sites("train", server_round)) == {
        "h0", "h1", "h2"}
    [reason] = reasons(strategy, "train")
    assert "in 8000 ciphertexts differs from the federation's" in reason

"""Differential privacy under encryption: clipping, the sites' noise shares, accounting, budgets.

Real TenSEAL ciphertexts summed by the aggregator's own code, the real ClientApp handlers on real
DICOM folders, and Opacus's accountant as the reference for every epsilon.
"""

import json
import math
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

import sites.client_app as client_app
from fedhealth.app.privacy_report import privacy_report
from fedhealth.core import fixed_point
from fedhealth.core.config import ConfigError, RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import load_aggregator_context
from fedhealth.core.crypto.codec import (
    RoundBinding,
    ciphertexts_to_record,
    decrypt_global,
    encrypt_update,
)
from fedhealth.core.crypto.keys import SiteKey
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.personalization import get_policy
from fedhealth.core.privacy_accounting import GaussianRelease, epsilon, epsilon_by_round
from fedhealth.core.run_history import TRAIN, Rejection, RunHistory, SiteRecord
from sites.audit import AuditLog
from sites.privacy_budget import CLIENT, LedgerEntry, PrivacyLedger
from sites.training import TrainSettings, dp_sgd_releases, local_round, site_model
from sites.update_privacy import UpdatePrivacy, noise_generator
from strategies.ciphertext_sum import RunningSum

DELTA = 1e-5
SITES = 3
TRAINING = "dp-test"
# The tests' run: three sites, uniform weights, tiny model at 32 px, one short epoch.
CONFIG = RunConfig(policy="fedavg", model="tiny", image_size=32, local_epochs=1, seed=0,
                   uniform_weights=True, dp_noise_multiplier=1.0, dp_clip_norm=0.2,
                   expected_sites=SITES)


def _opacus_epsilon(noise_multipliers: list[float], delta: float = DELTA) -> float:
    """Opacus's own figure: one full-batch Gaussian step per round."""
    accountant = RDPAccountant()
    for z in noise_multipliers:
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    return float(accountant.get_epsilon(delta))


def _shared_start(config: RunConfig) -> dict[str, np.ndarray]:
    """The shared tensors of the seed's model: what a round-1 update is a delta from."""
    model = site_model(config.model, num_classes=2, image_size=config.image_size,
                       seed=config.seed, dp_sgd=False)
    shared, _ = get_policy(config.policy).partition(model).split(
        {n: t.numpy() for n, t in model.state_dict().items()})
    return shared


def _instruction(config: RunConfig, key: SiteKey | None, server_round: int) -> Message:
    """A round-`server_round` train instruction without a global (sites start from the seed)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 0, 0
    record = config.to_record()
    record[wire.SERVER_ROUND] = server_round
    content = RecordDict({wire.CONFIG: record})
    if key is None:
        content[wire.ARRAYS] = ArrayRecord()
    else:
        content[wire.CRYPTO] = ConfigRecord({
            wire.SERVER_ROUND: server_round, wire.WEIGHT_SUM: 1.0, wire.SITE_WEIGHT: 1 / SITES,
            wire.LAYOUT_HASH: "", wire.FINGERPRINT: key.fingerprint,
            wire.TRAINING_ID: TRAINING, wire.NONCE: ""})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(data_dir: Path, state: Path, key_file: Path,
             **settings: bool | float | int | str) -> Context:
    node_config: dict[str, bool | float | int | str] = {
        "site-name": "hosp-a", "data-dir": str(data_dir), "state-dir": str(state),
        "key-file": str(key_file), "audit-log": str(state / "audit.jsonl"), **settings}
    return Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


# ------------------------------------------------------------------ clipping and noise


def test_clipping_bounds_the_norm_of_what_a_site_encrypts(synth_federation: Path, key_dir: Path,
                                                          site_key: SiteKey,
                                                          tmp_path: Path) -> None:
    """Through the real ClientApp: decrypt the reply, take away the seed's model and the site's
    noise (regenerated from its own noise key), and what is left, the update, has norm C."""
    state = tmp_path / "state"
    context = _context(synth_federation / "hospital-1", state, key_dir / wire.SITE_KEY_FILE)
    reply = client_app.train(_instruction(CONFIG, site_key, 1), context)
    assert not reply.has_error(), reply.error
    start = _shared_start(CONFIG)
    layout = TensorLayout.of(start)
    a_k = 1 / SITES
    # one site's reply decrypted alone: s = a_k, the mean is what the site encrypted / a_k
    sent = layout.flatten(decrypt_global(site_key, reply.content.array_records[wire.UPDATE], layout, a_k,
                                         binding=RoundBinding(TRAINING, 1)))
    privacy = UpdatePrivacy.of(CONFIG)
    assert privacy is not None
    noise = noise_generator(state, CONFIG.seed, 1).normal(0.0, privacy.noise_sd(a_k), layout.size)
    update = sent - layout.flatten(start) - noise
    # the grid moves each value by at most STEP/2 before the division by a_k; float32 by ~1e-7
    tolerance = math.sqrt(layout.size) * fixed_point.STEP / 2 / a_k + 1e-5
    assert abs(np.linalg.norm(update) - CONFIG.dp_clip_norm) <= tolerance
    [audited] = [e for e in AuditLog(state / "audit.jsonl").entries() if e["kind"] == "privacy"]
    assert audited["clipped"] is True  # a round of training moves the weights by more than 0.2
    assert audited["epsilon"] == _opacus_epsilon([CONFIG.dp_noise_multiplier])


def test_an_update_within_the_clip_norm_is_sent_unchanged() -> None:
    start = {"w": np.zeros(1000, dtype=np.float32)}
    small = {"w": np.full(1000, 0.001, dtype=np.float32)}  # norm 0.0316
    private = UpdatePrivacy(1e-12, 1.0).privatize(small, start, 0.5, np.random.default_rng(0))
    assert private.delta_norm == pytest.approx(0.0316, rel=1e-3)
    assert private.released_norm == pytest.approx(private.delta_norm)
    np.testing.assert_allclose(private.shared["w"], small["w"], atol=1e-9)


def test_the_decrypted_sum_carries_the_configured_noise(key_dir: Path, site_key: SiteKey) -> None:
    """K sites each add their share to a zero update, encrypt with real CKKS; the aggregator
    sums the ciphertexts; the decrypted mean's noise must have sd z * C / K (Flower's central
    figure). 24,000 values: the sample sd's relative standard error is 1/sqrt(2n) = 0.46%,
    so a tolerance of 2.5% is 5.5 standard errors; the mean must be 0 within 5 of its own."""
    privacy = UpdatePrivacy(noise_multiplier=0.8, clip_norm=0.5)
    size = 24_000
    start = {"w": np.linspace(-1, 1, size).astype(np.float32)}
    total = RunningSum(load_aggregator_context(key_dir / wire.AGGREGATOR_KEY_FILE), None)
    shares = []
    for k in range(SITES):
        private = privacy.privatize(start, start, 1 / SITES, np.random.default_rng(100 + k))
        shares.append(private.shared["w"].astype(np.float64) - start["w"])
        total.fold(encrypt_update(site_key, private.shared, 1 / SITES))
    layout = TensorLayout.of(start)
    mean = decrypt_global(site_key, ciphertexts_to_record(total.ciphertexts()), layout,
                          fixed_point.weight_sum([1 / SITES] * SITES))["w"]
    noise = mean.astype(np.float64) - start["w"]
    expected = privacy.noise_multiplier * privacy.clip_norm / SITES
    assert abs(noise.std() / expected - 1) < 0.025
    assert abs(noise.mean()) < 5 * expected / math.sqrt(size)
    # and each site's own share is z * C / sqrt(K): small alone, right in the sum
    share = expected * math.sqrt(SITES)
    for drawn in shares:
        assert abs(drawn.std() / share - 1) < 0.025


def test_a_noise_key_is_the_site_s_own_and_owner_only(tmp_path: Path) -> None:
    one = noise_generator(tmp_path / "a", 0, 1).normal(size=4)
    assert np.array_equal(one, noise_generator(tmp_path / "a", 0, 1).normal(size=4))  # both modes
    assert not np.array_equal(one, noise_generator(tmp_path / "b", 0, 1).normal(size=4))
    assert not np.array_equal(one, noise_generator(tmp_path / "a", 0, 2).normal(size=4))
    assert (tmp_path / "a" / "dp-noise.key").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ accounting


def test_epsilon_grows_with_rounds_and_is_opacus_s_own_figure() -> None:
    releases = [GaussianRelease(1.1)] * 6
    by_round = epsilon_by_round(releases, DELTA)
    assert all(b > a for a, b in pairwise(by_round))
    assert by_round == [_opacus_epsilon([1.1] * r) for r in range(1, 7)]
    assert epsilon([], DELTA) == 0.0
    # more noise, less epsilon; a smaller delta, more
    assert epsilon([GaussianRelease(2.0)] * 6, DELTA) < by_round[-1]
    assert epsilon(releases, 1e-7) > by_round[-1]


def test_the_server_accounts_for_the_noise_shares_that_were_summed() -> None:
    """Round 2 sums 2 of 3 sites (one refused): its noise is that of z * sqrt(2/3)."""
    history = RunHistory()
    for server_round, sites in ((1, 3), (2, 2), (3, 3)):
        for k in range(sites):
            history.record(TRAIN, server_round, SiteRecord(f"hospital-{k}", 10, {}))
    history.reject(Rejection(TRAIN, 2, 7, "hospital-2", "privacy-budget error at the site"))
    config = replace(CONFIG, expected_sites=0)
    report = privacy_report(config, history)
    rounds = report["rounds"]
    assert isinstance(rounds, dict)
    z = CONFIG.dp_noise_multiplier
    assert [r["noise_multiplier"] for r in rounds.values()] == [z, z * math.sqrt(2 / 3), z]
    assert [r["epsilon"] for r in rounds.values()] == [
        _opacus_epsilon([z]), _opacus_epsilon([z, z * math.sqrt(2 / 3)]),
        _opacus_epsilon([z, z * math.sqrt(2 / 3), z])]
    assert report["epsilon"] == rounds["3"]["epsilon"]
    json.dumps(report, allow_nan=False)  # results.json is strict JSON
    assert privacy_report(replace(config, dp_noise_multiplier=0.0), history)["epsilon"] is None


def test_dp_settings_without_a_guarantee_are_refused() -> None:
    with pytest.raises(ConfigError, match="uniform-weights"):
        RunConfig(dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="proximal term"):
        RunConfig(policy="fedprox", dp_sgd_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="'dp-clip-norm' is 0.0"):
        RunConfig(dp_clip_norm=0.0)


# ------------------------------------------------------------------ the site's budget


def test_a_site_over_its_budget_refuses_to_train(synth_federation: Path, key_dir: Path,
                                                 tmp_path: Path) -> None:
    """max-epsilon between one round's epsilon and two rounds': round 1 trains, round 2 is
    refused by the site itself (an error reply, audited), and nothing of round 2 is recorded."""
    config = replace(CONFIG, encrypted=False)
    one, two = _opacus_epsilon([1.0]), _opacus_epsilon([1.0, 1.0])
    state = tmp_path / "state"
    context = _context(synth_federation / "hospital-1", state, key_dir / wire.SITE_KEY_FILE,
                       **{"max-epsilon": (one + two) / 2})
    first = client_app.train(_instruction(config, None, 1), context)
    assert not first.has_error(), first.error
    second = client_app.train(_instruction(config, None, 2), context)
    assert second.has_error() and str(second.error.reason).startswith("privacy-budget error at")
    entries = AuditLog(state / "audit.jsonl").entries()
    assert [(e["kind"], e["round"]) for e in entries] == [("privacy", 1), ("train", 1), ("train", 2)]
    assert entries[0]["epsilon"] == one and "error" in entries[2]
    [detail] = [json.loads(line) for line in (state / "errors.jsonl").read_text().splitlines()]
    assert "max-epsilon" in detail["detail"] and f"{two:.3g}" in detail["detail"]
    ledger = PrivacyLedger(state, "hosp-a", "9")
    assert ledger.entries() == [LedgerEntry(1, CLIENT, 1.0, 1.0, 1)]


def test_a_site_with_a_budget_refuses_a_run_without_noise(synth_federation: Path, key_dir: Path,
                                                          tmp_path: Path) -> None:
    config = replace(CONFIG, encrypted=False, dp_noise_multiplier=0.0)
    context = _context(synth_federation / "hospital-1", tmp_path, key_dir / wire.SITE_KEY_FILE,
                       **{"max-epsilon": 10})
    reply = client_app.train(_instruction(config, None, 1), context)
    assert reply.has_error() and str(reply.error.reason).startswith("privacy-budget")
    assert "adds no differential-privacy noise" in (tmp_path / "errors.jsonl").read_text()


# ------------------------------------------------------------------ DP-SGD


def test_dp_sgd_trains_a_groupnorm_model_and_accounts_its_steps(synth_federation: Path) -> None:
    from sites.dataset import load_site

    splits = load_site(synth_federation / "hospital-1", image_size=32, seed=0)
    settings = replace(TrainSettings.from_run_config(replace(CONFIG, dp_noise_multiplier=0.0)),
                       dp_sgd_noise_multiplier=1.0, dp_sgd_clip_norm=1.0, dp_sgd_seed=5,
                       device="cpu")
    policy = get_policy("fedbn")
    output = local_round(policy, "tiny", global_shared=None, personal=None, splits=splits,
                         settings=settings, seed=0)
    assert not any("running" in n for n in (*output.shared, *output.personal))  # no BatchNorm
    assert all(np.isfinite(t).all() for t in output.shared.values())
    assert any(not np.array_equal(output.shared[n], output.start[n]) for n in output.shared)
    [release] = dp_sgd_releases(policy, settings, splits.train)
    batches = math.ceil(len(splits.train) / settings.batch_size)  # type: ignore[arg-type]
    assert release == GaussianRelease(1.0, 1 / batches, settings.local_epochs * batches)


# ------------------------------------------------------------------ compare --dp


def _run(noise: float, balanced: float, spent: float | None) -> dict[str, object]:
    per_site = {"hospital-1": {"balanced_accuracy": balanced, "balanced_accuracy_se": 0.01}}
    return {"strategy": "fedbn", "encrypted": True, "seed": 0, "seconds": 1.0, "rounds": 2,
            "per_site": per_site, "uplink_bytes_per_round": 10,
            "privacy": {"noise_multiplier": noise, "epsilon": spent, "delta": DELTA}}


def test_noise_levels_are_rows_with_their_epsilon_and_plot(tmp_path: Path) -> None:
    from fedhealth.app.report import plot_privacy, results_table
    from fedhealth.app.summary import summarize

    runs = [_run(0.0, 0.9, None), _run(0.3, 0.7, 88.0), _run(1.0, 0.55, 16.5)]
    rows = summarize(runs)
    assert [r.label for r in rows] == ["fedbn (encrypted)", "fedbn (encrypted, DP z=0.3)",
                                       "fedbn (encrypted, DP z=1)"]
    assert [r.epsilon for r in rows] == [None, 88.0, 16.5]
    assert "epsilon" in [c.header for c in results_table(runs).columns]
    assert plot_privacy(runs, tmp_path / "p.png").stat().st_size > 0


def test_compare_refuses_bad_noise_levels_before_running() -> None:
    from typer.testing import CliRunner

    from fedhealth.app.cli import app
    from fedhealth.app.compare import parse_noise_levels

    assert parse_noise_levels("0, 0.5,1") == [0.0, 0.5, 1.0]
    result = CliRunner().invoke(app, ["compare", "--data", ".", "--out", "r.json",
                                      "--dp", "0,-1"])
    assert result.exit_code == 2 and "numbers >= 0" in result.output


def test_a_dp_sgd_round_through_the_clientapp_audits_opacus_s_sample_epsilon(
        synth_federation: Path, key_dir: Path, tmp_path: Path) -> None:
    from sites.dataset import load_site

    config = replace(CONFIG, encrypted=False, policy="fedbn", dp_noise_multiplier=0.0,
                     dp_sgd_noise_multiplier=1.5, dp_sgd_clip_norm=1.0)
    context = _context(synth_federation / "hospital-1", tmp_path, key_dir / wire.SITE_KEY_FILE)
    reply = client_app.train(_instruction(config, None, 1), context)
    assert not reply.has_error(), reply.error
    assert not any("running" in name for name in reply.content[wire.ARRAYS])  # GroupNorm
    [audited] = [e for e in AuditLog(tmp_path / "audit.jsonl").entries() if e["kind"] == "privacy"]
    train = load_site(synth_federation / "hospital-1", image_size=32, seed=0).train
    batches = math.ceil(len(train) / config.batch_size)  # type: ignore[arg-type]
    accountant = RDPAccountant()
    for _ in range(config.local_epochs * batches):
        accountant.step(noise_multiplier=1.5, sample_rate=1 / batches)
    assert audited["epsilon"] is None
    assert audited["sample_epsilon"] == accountant.get_epsilon(DELTA)

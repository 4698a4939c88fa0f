"""The ClientApp a hospital runs (Flower Message API).

train:    global model in (decrypted here and nowhere else) + personal layers from the site store
          -> local training on the site's own DICOM -> personal layers back to the store
          -> E(a_k * shared) out.
evaluate: the same model scored on the site's held-out test split; plaintext metrics out;
          in encrypted runs the round is filed so the site can export it (sites.round_archive).
query:    the aggregator's census of training sample counts (for a_k = n_k / sum n).
Under differential privacy a train call first holds the round to the site's own budget
(sites.privacy_budget), then clips and noises what it shares (sites.update_privacy) and
audits the epsilon spent before the reply leaves.
Every reply is written to the site's audit log before it leaves. A call that fails replies
Flower's error message with only a category and a reference (sites.failure), audited too;
metrics and counts leave as the site's disclosure settings allow (sites.disclosure).
"""

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import is_census
from fedhealth.core.models import model_spec
from fedhealth.core.personalization import get_policy
from sites.audit import AuditLog
from sites.data_limits import DataLimits
from sites.dataset import SiteSplits, load_site, site_cache_dir, volume_depth_of
from sites.exchange import Exchange, census_reply, read_exchange, read_run_config
from sites.failure import record_failure
from sites.personal_store import PersonalStore
from sites.privacy_budget import CLIENT, SAMPLE, LedgerEntry, PrivacyLedger, check_budget
from sites.round_archive import RoundArchive, RoundFacts, site_tensors
from sites.site_settings import SiteSettings, resolve_site
from sites.training import (
    TrainSettings,
    dataset_size,
    dp_sgd_releases,
    local_round,
    score_site,
    site_model,
)
from sites.update_privacy import UpdatePrivacy, noise_generator, noise_seed, usable_global

app = ClientApp()


@lru_cache(maxsize=8)
def _site_data(data_dir: Path, labels: Path | None, image_size: int, seed: int,
               cache_dir: Path, task: str, limits: DataLimits,
               volume_depth: int | None, in_channels: int) -> SiteSplits:
    return load_site(data_dir, labels=labels, image_size=image_size, seed=seed,
                     cache_dir=cache_dir, task=task, limits=limits, volume_depth=volume_depth,
                     in_channels=in_channels)


def site_data(site: SiteSettings, config: RunConfig) -> SiteSplits:
    """Index and decode a site's DICOM once per process; decoded tensors also persist on disk."""
    return _site_data(site.data_dir, site.labels, config.image_size, config.seed,
                      site_cache_dir(site.state_dir), model_spec(config.model).task, site.limits,
                      volume_depth_of(config), config.in_channels)


@lru_cache(maxsize=8)
def shared_layout(model: str, policy: str, num_classes: int, image_size: int,
                  dp_sgd: bool, in_channels: int = 1) -> TensorLayout:
    """The layout of the tensors this site shares: what E(global) must decrypt into."""
    network = site_model(model, num_classes=num_classes, image_size=image_size, seed=0,
                         dp_sgd=dp_sgd, in_channels=in_channels)
    shared, _ = get_policy(policy).partition(network).split(
        {n: t.numpy() for n, t in network.state_dict().items()})
    return TensorLayout.of(shared)


class SiteRound:
    """One message's work at this site: where things are, and the model it starts from."""

    def __init__(self, message: Message, context: Context, config: RunConfig,
                 site: SiteSettings) -> None:
        self.config = config
        self.site = site
        self.exchange: Exchange = read_exchange(message.content, self.config, self.site,
                                                context.state)
        self.policy = get_policy(self.config.policy)
        self.splits = site_data(self.site, self.config)
        self.store = PersonalStore(context.state, self.site.state_dir,
                                   run_key=self.exchange.personal_key(context.run_id),
                                   site=self.site.name)
        self.settings = TrainSettings.from_run_config(self.config)
        self.run_id = context.run_id
        self.update_privacy = UpdatePrivacy.of(config)

    @property
    def layout(self) -> TensorLayout:
        return shared_layout(self.config.model, self.config.policy, self.splits.num_classes,
                             self.config.image_size, self.settings.dp_sgd,
                             self.config.in_channels)

    def global_shared(self) -> dict[str, np.ndarray] | None:
        received = self.exchange.global_shared(self.layout)
        return usable_global(received) if self.update_privacy else received

# One call's answer: (server round, reply content), from the message, the run config and the site.
Answer = Callable[[Message, Context, RunConfig, SiteSettings], tuple[int, RecordDict]]


def replying(kind: str, message: Message, context: Context, answer: Answer,
             server_round: int | None = None) -> Message:
    """Run `answer`; audit and send its reply, or, if anything fails, an error reply that names
    only a category and a reference (the detail goes to the site's error log), audited too.

    `server_round`: the round a failure is audited under when the call's round is fixed (the
    census is round 0); otherwise the round the instruction declares."""
    site: SiteSettings | None = None
    server_round = declared_round(message) if server_round is None else server_round
    try:
        config = read_run_config(message.content)
        site = resolve_site(context.node_config, config)
        server_round, content = answer(message, context, config, site)
    except Exception as err:  # whatever failed, the aggregator gets a clean, path-free error
        site = site or _site_if_known(context)
        failure = record_failure(err, site.error_log if site else None, kind=kind,
                                 run_id=context.run_id, server_round=server_round)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=failure.reason)
        if site is not None:
            AuditLog(site.audit_log).record_error(context.run_id, server_round, kind, error)
        return Message(error, reply_to=message)
    AuditLog(site.audit_log).record(context.run_id, server_round, kind, content)
    return Message(content, reply_to=message)


def _site_if_known(context: Context) -> SiteSettings | None:
    """A deployed site's settings even when the run config is unreadable (they do not depend on
    it); None when the node config cannot say (then the failure is logged by this process only)."""
    try:
        return resolve_site(context.node_config, RunConfig())
    except Exception:  # the failure being answered is reported; this one would only hide it
        return None


def declared_round(message: Message) -> int | None:
    """The round an instruction says it is for, read without trusting it (None if it says none):
    what an error reply's audit line is filed under when the call fails before reading it."""
    if not message.has_content():
        return None
    for name in (wire.CRYPTO, wire.CONFIG):
        record = message.content.config_records.get(name)
        value = record.get(wire.SERVER_ROUND) if record is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _train(message: Message, context: Context, config: RunConfig,
           site: SiteSettings) -> tuple[int, RecordDict]:
    work = SiteRound(message, context, config, site)
    server_round = work.exchange.server_round
    ledger = PrivacyLedger(site.state_dir, site.name, work.exchange.personal_key(context.run_id))
    planned = _planned_releases(work)
    spent = check_budget(ledger, planned, site.max_epsilon, config.dp_delta, site.name)
    settings = work.settings
    if settings.dp_sgd:
        settings = replace(settings, dp_sgd_seed=noise_seed(site.state_dir, config.seed,
                                                            server_round, "sgd"))
    output = local_round(work.policy, work.config.model, global_shared=work.global_shared(),
                         personal=work.store.load(), splits=work.splits, settings=settings,
                         seed=work.config.seed, server_round=server_round)
    work.store.save(output.personal)
    shared, clipped = output.shared, None
    if work.update_privacy is not None:
        private = work.update_privacy.privatize(
            shared, output.start, work.exchange.site_weight,
            noise_generator(site.state_dir, config.seed, server_round))
        shared, clipped = private.shared, private.delta_norm > config.dp_clip_norm
    if planned:
        ledger.record(planned)
        AuditLog(site.audit_log).record_privacy(context.run_id, server_round, {
            "training": work.exchange.personal_key(context.run_id), **spent.to_json(),
            "noise_multiplier": config.dp_noise_multiplier, "clip_norm": config.dp_clip_norm,
            "sgd_noise_multiplier": config.dp_sgd_noise_multiplier, "clipped": clipped})
    shown = site.disclosure
    return server_round, work.exchange.train_reply(
        shared, shown.count(output.num_examples), shown.metrics(output.metrics), site.name)


def _planned_releases(work: SiteRound) -> list[LedgerEntry]:
    """The DP releases training this round makes at this site (none without DP)."""
    server_round = work.exchange.server_round
    planned = [LedgerEntry(server_round, SAMPLE, r.noise_multiplier, r.sample_rate, r.steps)
               for r in dp_sgd_releases(work.policy, work.settings, work.splits.train)]
    if work.update_privacy is not None:
        release = work.update_privacy.release
        planned.insert(0, LedgerEntry(server_round, CLIENT, release.noise_multiplier,
                                      release.sample_rate, release.steps))
    return planned


def _evaluate(message: Message, context: Context, config: RunConfig,
              site: SiteSettings) -> tuple[int, RecordDict]:
    work = SiteRound(message, context, config, site)
    global_shared = work.global_shared()
    last = work.exchange.server_round >= config.num_server_rounds  # whose score is the result
    score = score_site(work.policy, work.config.model, global_shared=global_shared,
                       personal=work.store.load(), splits=work.splits, settings=work.settings,
                       seed=work.config.seed, sample=0 if last else config.progress_test_images)
    metrics = dict(score.metrics)
    if (received := work.exchange.received) is not None:  # kept to export this round's model
        scored = {n: t.detach().cpu().numpy() for n, t in score.model.state_dict().items()}
        facts = RoundFacts.scored(site.name, received, config.to_flower(), work.layout,
                                  site.limits, score.threshold, metrics,
                                  dataset_size(work.splits.train))
        RoundArchive(site.state_dir, site.name).keep(received, facts,
                                                     site_tensors(scored, global_shared))
    num_examples = int(metrics.pop("num-examples"))
    shown = site.disclosure
    return work.exchange.server_round, work.exchange.evaluate_reply(
        shown.count(num_examples), shown.metrics(metrics), site.name)


def _census(message: Message, context: Context, config: RunConfig,
            site: SiteSettings) -> tuple[int, RecordDict]:
    if not is_census(message.content):
        raise ValueError("unknown query: this site answers only the fedhealth census")
    count = site.disclosure.count(dataset_size(site_data(site, config).train))
    return 0, census_reply(message.content, site, count)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One local round; only the shared tensors leave, encrypted in encrypted runs."""
    return replying("train", message, context, _train)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score global + personal on the site's own test split; reply metrics only."""
    return replying("evaluate", message, context, _evaluate)


@app.query()
def census(message: Message, context: Context) -> Message:
    """Answer the aggregator's census with this site's training sample count."""
    return replying("query", message, context, _census, server_round=0)

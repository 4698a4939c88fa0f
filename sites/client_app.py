"""The ClientApp a hospital runs (Flower Message API).

train:    global model in (decrypted here and nowhere else) + personal layers from the site store
          -> local training on the site's own DICOM -> personal layers back to the store
          -> E(a_k * shared) out.
evaluate: the same model scored on the site's held-out test split; plaintext metrics out.
query:    the aggregator's census of training sample counts (for a_k = n_k / sum n).
Every reply is written to the site's audit log before it leaves.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.crypto.messages import build_census_reply, is_census
from fedhealth.core.models import build_model, model_spec
from fedhealth.core.personalization import get_policy
from sites.audit import AuditLog
from sites.dataset import SiteSplits, load_site
from sites.exchange import Exchange, cached_site_key, read_exchange, read_run_config
from sites.personal_store import PersonalStore
from sites.site_settings import SiteSettings, resolve_site
from sites.training import TrainSettings, evaluate_site, local_round

app = ClientApp()


@lru_cache(maxsize=8)
def _site_data(data_dir: Path, labels: Path | None, image_size: int, seed: int,
               cache_dir: Path, task: str) -> SiteSplits:
    return load_site(data_dir, labels=labels, image_size=image_size, seed=seed,
                     cache_dir=cache_dir, task=task)


def site_data(site: SiteSettings, config: RunConfig) -> SiteSplits:
    """Index and decode a site's DICOM once per process; decoded tensors also persist on disk."""
    return _site_data(site.data_dir, site.labels, config.image_size, config.seed,
                      site.state_dir / "cache", model_spec(config.model).task)


@lru_cache(maxsize=8)
def shared_layout(model: str, policy: str, num_classes: int, image_size: int) -> TensorLayout:
    """The layout of the tensors this site shares: what E(global) must decrypt into."""
    network = build_model(model, num_classes=num_classes, image_size=image_size)
    shared, _ = get_policy(policy).partition(network).split(
        {n: t.numpy() for n, t in network.state_dict().items()})
    return TensorLayout.of(shared)


class SiteRound:
    """One message's work at this site: where things are, and the model it starts from."""

    def __init__(self, message: Message, context: Context) -> None:
        self.config = read_run_config(message.content)
        self.site: SiteSettings = resolve_site(context.node_config, self.config)
        self.exchange: Exchange = read_exchange(message.content, self.config, self.site.key_file)
        self.policy = get_policy(self.config.policy)
        self.splits = site_data(self.site, self.config)
        self.store = PersonalStore(context.state, self.site.state_dir,
                                   run_key=self.exchange.personal_key(context.run_id),
                                   site=self.site.name)
        self.settings = TrainSettings.from_run_config(self.config)
        self.run_id = context.run_id

    def global_shared(self) -> dict[str, np.ndarray] | None:
        return self.exchange.global_shared(shared_layout(
            self.config.model, self.config.policy, self.splits.num_classes,
            self.config.image_size))

    def reply(self, message: Message, kind: str, content: RecordDict) -> Message:
        """Audit, then send."""
        AuditLog(self.site.audit_log).record(self.run_id, self.exchange.server_round, kind, content)
        return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One local round; only the shared tensors leave, encrypted in encrypted runs."""
    work = SiteRound(message, context)
    output = local_round(work.policy, work.config.model, global_shared=work.global_shared(),
                         personal=work.store.load(), splits=work.splits, settings=work.settings,
                         seed=work.config.seed, server_round=work.exchange.server_round)
    work.store.save(output.personal)
    content = work.exchange.train_reply(output.shared, output.num_examples, output.metrics,
                                        work.site.name)
    return work.reply(message, "train", content)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score global + personal on the site's own test split; reply metrics only."""
    work = SiteRound(message, context)
    metrics = evaluate_site(work.policy, work.config.model, global_shared=work.global_shared(),
                            personal=work.store.load(), splits=work.splits,
                            settings=work.settings, seed=work.config.seed)
    num_examples = int(metrics.pop("num-examples"))
    content = work.exchange.evaluate_reply(num_examples, metrics, work.site.name)
    return work.reply(message, "evaluate", content)


@app.query()
def census(message: Message, context: Context) -> Message:
    """Answer the aggregator's census with this site's training sample count."""
    if not is_census(message.content):
        raise ValueError("unknown query: this site answers only the fedhealth census")
    config = read_run_config(message.content)
    site = resolve_site(context.node_config, config)
    splits = site_data(site, config)
    content = build_census_reply(cached_site_key(site.key_file), len(splits.train), site.name)
    AuditLog(site.audit_log).record(context.run_id, 0, "query", content)
    return Message(content, reply_to=message)

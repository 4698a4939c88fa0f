"""A site's local training and evaluation under a personalization policy.

One training loop (`_fit`) serves every policy and both baselines: policies differ only in which
tensors they load, which parameters they train, and which anchor the proximal term pulls towards.

Sample-level DP-SGD (run config `dp-sgd-noise-multiplier` > 0) runs the same loop through
Opacus: Poisson-sampled batches, every example's gradient clipped to `dp-sgd-clip-norm`,
Gaussian noise on their sum. Per-example gradients and BatchNorm cannot go together (a batch's
statistics mix its examples), so under DP-SGD every site builds the zoo model with each
BatchNorm replaced by GroupNorm (Opacus's `ModuleValidator.fix`; `site_model`): FedBN then keeps
the GroupNorm scales and shifts on site (there are no running statistics to keep), FedPer and
FedRep keep their meaning, and the proximal policies are refused by the run config.
"""

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, cast

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, compute_roc_auc
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from fedhealth.core.config import RunConfig
from fedhealth.core.models import Task, build_model, model_spec
from fedhealth.core.personalization import PERSONAL_MODEL_PREFIX, Partition, Policy
from fedhealth.core.privacy_accounting import GaussianRelease

Arrays = dict[str, np.ndarray]
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}  # config.OPTIMIZER_NAMES


class Splits(Protocol):
    """What a site's data pipeline provides (sites.dataset.SiteSplits)."""

    name: str
    num_classes: int
    train: Dataset
    val: Dataset
    test: Dataset


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_RUN_DEFAULTS = RunConfig()


@dataclass(frozen=True)
class TrainSettings:
    """Local training knobs: the run config's training fields (and its defaults), plus what only a
    site decides. `head_epochs` is FedRep's head-only phase before the body's epochs."""

    local_epochs: int = _RUN_DEFAULTS.local_epochs
    batch_size: int = _RUN_DEFAULTS.batch_size
    optimizer: str = _RUN_DEFAULTS.optimizer
    learning_rate: float = _RUN_DEFAULTS.learning_rate
    proximal_mu: float = _RUN_DEFAULTS.proximal_mu
    image_size: int = _RUN_DEFAULTS.image_size
    in_channels: int = _RUN_DEFAULTS.in_channels
    balanced_loss: bool = _RUN_DEFAULTS.balanced_loss
    dp_sgd_noise_multiplier: float = _RUN_DEFAULTS.dp_sgd_noise_multiplier
    dp_sgd_clip_norm: float = _RUN_DEFAULTS.dp_sgd_clip_norm
    head_epochs: int = 1
    device: str = field(default_factory=default_device)
    # Seeds DP-SGD's noise: a site derives it from a secret it alone holds
    # (sites.update_privacy.noise_seed), so nobody who knows the run seed can regenerate it.
    dp_sgd_seed: int | None = None

    def __post_init__(self) -> None:
        # The run config refuses bad values when it is built; this guards settings built directly.
        replace(_RUN_DEFAULTS, **{f.name: getattr(self, f.name) for f in fields(self)
                                  if f.name in _RUN_FIELDS})
        if self.head_epochs < 1:
            raise ValueError(f"head_epochs must be at least 1, got {self.head_epochs}")

    @classmethod
    def from_run_config(cls, config: RunConfig) -> "TrainSettings":
        return cls(**{name: getattr(config, name) for name in _RUN_FIELDS})

    @property
    def dp_sgd(self) -> bool:
        return self.dp_sgd_noise_multiplier > 0


_RUN_FIELDS = tuple(f.name for f in fields(TrainSettings) if f.name in
                    {g.name for g in fields(RunConfig)})


@dataclass(frozen=True)
class RoundOutput:
    """What one local round produces: `shared` is encrypted and sent, `personal` stays on site.
    `start` is the shared tensors the round started from (what an update is a delta from)."""

    shared: Arrays
    personal: Arrays
    num_examples: int
    metrics: dict[str, float]
    start: Arrays


def site_model(model_name: str, *, num_classes: int, image_size: int, seed: int,
               dp_sgd: bool, in_channels: int = 1) -> nn.Module:
    """The zoo model every site builds from the seed; under DP-SGD with BatchNorm replaced by
    GroupNorm (Opacus's fixer, deterministic: weights 1, biases 0), which changes the shared
    tensors' layout the same way at every site."""
    model = build_model(model_name, num_classes=num_classes, image_size=image_size,
                        in_channels=in_channels, seed=seed)
    if not dp_sgd:
        return model
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def local_round(policy: Policy, model_name: str, *, global_shared: Mapping[str, np.ndarray] | None,
                personal: Mapping[str, np.ndarray] | None, splits: Splits, settings: TrainSettings,
                seed: int, server_round: int = 1) -> RoundOutput:
    """Train one round on `splits.train` from the received global and this site's personal tensors.

    `seed` is the run's seed (every site builds the same round-1 model from it); shuffling is seeded
    from (seed, server_round) so a run is reproducible on CPU. `global_shared=None` means round 1.
    """
    _require_examples(splits, "train")
    model, partition = _assemble(policy, model_name, global_shared, personal, splits.num_classes,
                                 settings, seed)
    received = {n: t.detach().clone() for n, t in model.state_dict().items()}
    params = [n for n, _ in model.named_parameters()]
    pull = {n: received[n] for n in params}  # the proximal anchor: the received global weights
    task = model_spec(model_name).task
    fit_seed = seed * 100_003 + server_round
    metrics: dict[str, float] = {}
    if policy.head_first:
        head = [n for n in partition.personal if n in params]
        metrics["head_train_loss"] = _fit(model, splits.train, settings, task,
                                          epochs=settings.head_epochs, seed=fit_seed, trainable=head)
        body = [n for n in partition.shared if n in params]
        metrics["train_loss"] = _fit(model, splits.train, settings, task,
                                     epochs=settings.local_epochs, seed=fit_seed, trainable=body)
    else:
        metrics["train_loss"] = _fit(model, splits.train, settings, task,
                                     epochs=settings.local_epochs, seed=fit_seed,
                                     anchor=pull if policy.proximal else None)
    shared, kept = partition.split(_to_numpy(model.state_dict()))
    start, _ = partition.split(_to_numpy(received))
    if policy.personal_model:
        mine = _personal_model(model_name, personal, received, splits.num_classes, settings, seed)
        metrics["personal_train_loss"] = _fit(mine, splits.train, settings, task,
                                              epochs=settings.local_epochs, seed=fit_seed,
                                              anchor=pull)
        kept |= {PERSONAL_MODEL_PREFIX + n: t for n, t in _to_numpy(mine.state_dict()).items()}
    return RoundOutput(shared=shared, personal=kept, num_examples=dataset_size(splits.train),
                       metrics=metrics, start=start)


def dp_sgd_releases(policy: Policy, settings: TrainSettings,
                    dataset: Dataset) -> tuple[GaussianRelease, ...]:
    """What one `local_round` of DP-SGD on `dataset` releases, as the accountant composes it
    (none without DP-SGD): every training phase (FedRep: head, then body) is `epochs` passes of
    Opacus's Poisson sampler, which draws each example with rate 1 / (batches per epoch)."""
    if not settings.dp_sgd:
        return ()
    batches = math.ceil(dataset_size(dataset) / settings.batch_size)
    phases = (settings.head_epochs, settings.local_epochs) if policy.head_first else \
        (settings.local_epochs,)
    return tuple(GaussianRelease(settings.dp_sgd_noise_multiplier, 1.0 / batches,
                                 epochs * batches) for epochs in phases)


def evaluate_site(policy: Policy, model_name: str, *,
                  global_shared: Mapping[str, np.ndarray] | None,
                  personal: Mapping[str, np.ndarray] | None, splits: Splits,
                  settings: TrainSettings, split: str = "test", seed: int = 0) -> dict[str, float]:
    """Metrics of the site's model on one of its own splits (see `score_site`)."""
    return score_site(policy, model_name, global_shared=global_shared, personal=personal,
                      splits=splits, settings=settings, split=split, seed=seed).metrics


@dataclass(frozen=True)
class SiteScore:
    """A model as its site scored it, which is how the site would deploy it: `model` holds the
    site's own normalisation statistics under FedBN; `threshold` is the operating point chosen on
    the site's validation split (None: argmax). What a site exports (sites.bundle_export)."""

    model: nn.Module
    threshold: float | None
    metrics: dict[str, float]


def score_site(policy: Policy, model_name: str, *,
               global_shared: Mapping[str, np.ndarray] | None,
               personal: Mapping[str, np.ndarray] | None, splits: Splits,
               settings: TrainSettings, split: str = "test", seed: int = 0,
               sample: int = 0) -> SiteScore:
    """The site's model scored on one of its own splits (see `score_on_site`).

    The site's model is global shared + personal tensors; under Ditto it is the personal model once
    one exists (before the first round, the global one). `sample` > 0 scores that many of the
    split's examples (`fixed_sample`: the same ones every round), for a learning curve.
    """
    if policy.personal_model and personal and _has_personal_model(personal):
        model = _personal_model(model_name, personal, {}, splits.num_classes, settings, seed)
    else:
        model, _ = _assemble(policy, model_name, global_shared, personal, splits.num_classes,
                             settings, seed)
    return _score(model, splits, settings, model_spec(model_name).task, split=split,
                  own_statistics=policy.personal_layers == "norm", sample=sample)


def score_on_site(model: nn.Module, splits: Splits, settings: TrainSettings,
                  task: Task = "classification", *, split: str = "test",
                  own_statistics: bool = False) -> dict[str, float]:
    """Score `model` on a site's `split` the way that site would deploy it.

    own_statistics: the model's normalisation layers are the site's own (FedBN), so their running
        statistics are re-estimated on the site's training split for the weights being scored: the
        stored ones were measured under the site's pre-averaging weights and no longer describe
        the averaged ones, which shifts every logit (the model ranks images but predicts one class).
    A binary classifier's operating point is chosen on the site's validation split (the threshold
    on P(finding) that maximises balanced accuracy there), as a department sets its own; the test
    split is never used to choose it. AUC does not depend on it.
    """
    return _score(model, splits, settings, task, split=split, own_statistics=own_statistics).metrics


def _score(model: nn.Module, splits: Splits, settings: TrainSettings, task: Task, *, split: str,
           own_statistics: bool, sample: int = 0) -> SiteScore:
    dataset = fixed_sample(_require_examples(splits, split), sample)
    if own_statistics:
        estimate_norm_statistics(model, splits.train, settings)
    threshold = None
    if task == "classification" and splits.num_classes == 2 and dataset_size(splits.val) > 0:
        threshold = operating_threshold(*_predict(model, splits.val, settings, task))
    return SiteScore(model, threshold,
                     evaluate_model(model, dataset, settings, task, threshold=threshold))


def fixed_sample(dataset: Dataset, size: int) -> Dataset:
    """`size` examples of `dataset` drawn by a fixed seed, in their order: the same ones for every
    model and round, so a curve's steps are the models', not the draw's (0, or a dataset no
    larger than `size`: all of it)."""
    total = dataset_size(dataset)
    if size <= 0 or size >= total:
        return dataset
    chosen = np.sort(np.random.default_rng(0).choice(total, size, replace=False))
    return Subset(dataset, chosen.tolist())


def estimate_norm_statistics(model: nn.Module, dataset: Dataset, settings: TrainSettings) -> None:
    """Replace every BatchNorm's running mean and variance by those of `dataset` under the current
    weights (one pass, exact averages rather than a momentum trail). Nothing else changes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
        m.train()
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=settings.batch_size, num_workers=0):
                model(batch["image"].to(settings.device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def operating_threshold(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold on P(class 1) with the best balanced accuracy on (`logits`, `labels`).

    Ties go to the threshold nearest 0.5 (argmax); a split holding one class gives 0.5.
    """
    if labels.unique().numel() < 2:
        return 0.5
    scores = logits.softmax(dim=1)[:, 1].double()
    values = scores.unique()  # sorted
    candidates = torch.cat([values[:1] - 1e-12, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-12])
    positive = labels == 1
    predicted = scores[None, :] >= candidates[:, None]
    balanced = ((predicted & positive).sum(1) / positive.sum()
                + (~predicted & ~positive).sum(1) / (~positive).sum()) / 2
    best = balanced == balanced.max()
    distance = torch.where(best, (candidates - 0.5).abs(), torch.inf)
    return float(candidates[distance.argmin()])


def train_centrally(model_name: str, dataset: Dataset, settings: TrainSettings, *,
                    num_classes: int, seed: int, epochs: int) -> nn.Module:
    """Train one model on one dataset: the `local` (one site) and `pooled` (all sites) baselines."""
    model = site_model(model_name, num_classes=num_classes, image_size=settings.image_size,
                       seed=seed, dp_sgd=settings.dp_sgd,
                       in_channels=settings.in_channels).to(settings.device)
    _fit(model, dataset, settings, model_spec(model_name).task, epochs=epochs, seed=seed)
    return model


def evaluate_model(model: nn.Module, dataset: Dataset, settings: TrainSettings,
                   task: Task = "classification", *,
                   threshold: float | None = None) -> dict[str, float]:
    """Loss and task metrics of `model` on `dataset` (see `classification_metrics`)."""
    logits, targets = _predict(model, dataset, settings, task)
    loss = _loss(task)(logits, targets).item()
    metrics = (classification_metrics(logits, targets, threshold=threshold)
               if task == "classification" else _dice(logits, targets))
    return {**metrics, "loss": loss, "num-examples": float(len(targets))}


def _predict(model: nn.Module, dataset: Dataset, settings: TrainSettings,
             task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of `model` in eval mode over `dataset`, on the CPU."""
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=settings.batch_size, num_workers=0):
            x, y = _inputs(batch, task, settings.device)
            outputs.append(model(x).cpu())
            targets.append(y.cpu())
    return torch.cat(outputs), torch.cat(targets)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, *,
                           threshold: float | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and macro one-vs-rest AUC.

    Predictions are the argmax, or for two classes P(class 1) >= `threshold` when one is given.
    AUC is defined only for classes that occur in `labels` alongside other classes; when no class
    qualifies (a split holding one class), AUC is reported as 0.5 (no discrimination shown) and
    `auc_defined` as 0.0, so means across sites stay finite and the gap stays visible.
    `balanced_accuracy_se` is its bootstrap standard error over the split's images, so whoever
    compares sites or strategies can tell a difference from test-set luck.
    """
    predicted = logits.argmax(dim=1)
    if threshold is not None and logits.shape[1] == 2:
        predicted = (logits.softmax(dim=1)[:, 1] >= threshold).long()
    onehot = nn.functional.one_hot(labels, logits.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for each class that is absent, as intended
        per_class = compute_roc_auc(logits.softmax(dim=1), onehot, average="none")
    defined = [float(a) for a in np.atleast_1d(np.asarray(per_class, dtype=float)) if not np.isnan(a)]
    return {"accuracy": (predicted == labels).float().mean().item(),
            "balanced_accuracy": balanced_accuracy(predicted, labels),
            "balanced_accuracy_se": bootstrap_se(predicted, labels),
            "auc": float(np.mean(defined)) if defined else 0.5,
            "auc_defined": float(bool(defined))}


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present in `labels`."""
    return float(np.mean([(predicted[labels == c] == c).float().mean().item()
                          for c in labels.unique()]))


def bootstrap_se(predicted: torch.Tensor, labels: torch.Tensor, resamples: int = 1000,
                 seed: int = 0) -> float:
    """Bootstrap standard error of the balanced accuracy: images resampled with replacement.

    Deterministic for a seed; a resample that lacks a class present in `labels` scores the classes
    it has, as `balanced_accuracy` would.
    """
    n = len(labels)
    if n < 2:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (resamples, n), generator=generator)
    right, truth = (predicted == labels)[picks].double(), labels[picks]
    recalls = []
    for c in labels.unique():
        members = (truth == c).double()
        count = members.sum(dim=1)
        recalls.append(torch.where(count > 0, (right * members).sum(dim=1) / count.clamp(min=1),
                                   torch.nan))
    scores = torch.stack(recalls).nanmean(dim=0)
    return float(scores.std())


def _dice(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    # An image with an empty mask scores 1 if nothing is predicted, else 0 (ignore_empty=False).
    classes = logits.shape[1]
    predicted = nn.functional.one_hot(logits.argmax(dim=1), classes).movedim(-1, 1)
    truth = nn.functional.one_hot(masks[:, 0].long(), classes).movedim(-1, 1)
    dice = cast(torch.Tensor, DiceMetric(include_background=False, ignore_empty=False)(predicted,
                                                                                     truth))
    return {"dice": dice.mean().item()}


def _fit(model: nn.Module, dataset: Dataset, settings: TrainSettings, task: Task, *, epochs: int,
         seed: int, trainable: Iterable[str] | None = None,
         anchor: Mapping[str, torch.Tensor] | None = None) -> float:
    """Train `model` in place; returns the mean loss of the last epoch.

    trainable: parameter names to update (the rest are frozen); all when None.
    anchor: adds proximal_mu/2 * ||w - anchor||^2 over the anchored parameters (FedProx, Ditto).
    """
    names = set(trainable) if trainable is not None else None
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    frozen = [p for n, p in model.named_parameters() if names is not None and n not in names]
    for p in frozen:
        p.requires_grad_(False)
    anchored = [(p, anchor[n]) for n, p in model.named_parameters() if anchor and n in anchor]
    optimizer = OPTIMIZERS[settings.optimizer](params, lr=settings.learning_rate)
    balanced = settings.balanced_loss and task == "classification"
    loss_fn = BalancedCrossEntropy(dataset_labels(dataset)) if balanced else _loss(task)
    model.train()
    private = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                                num_workers=0, generator=torch.Generator().manual_seed(seed))
            forward: nn.Module = model
            if settings.dp_sgd:
                forward, optimizer, loader = private = _dp_sgd(model, optimizer, loader, settings)
            total, count = 0.0, 0
            for _ in range(epochs):
                total, count = 0.0, 0
                for batch in loader:
                    x, y = _inputs(batch, task, settings.device)
                    if not len(x):  # a Poisson batch can be empty: nothing to learn from
                        continue
                    loss = loss_fn(forward(x), y)
                    total, count = total + loss.item() * len(x), count + len(x)
                    if anchored:
                        loss = loss + settings.proximal_mu / 2 * sum(
                            (p - a).pow(2).sum() for p, a in anchored)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    finally:
        if private is not None:
            private[0]._close()  # Opacus's hooks and per-sample gradients off the model
        for p in frozen:
            p.requires_grad_(True)
    return total / max(count, 1)


def _dp_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
            settings: TrainSettings) -> tuple[Any, torch.optim.Optimizer, DataLoader]:
    """Opacus's DP-SGD around `model`, `optimizer` and `loader` (Poisson sampling, flat
    per-example clipping, noise from the site's secret seed when it has one)."""
    from opacus import PrivacyEngine

    noise = (torch.Generator().manual_seed(settings.dp_sgd_seed)
             if settings.dp_sgd_seed is not None else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that secure_mode (a CSPRNG) is off
        module, private_optimizer, private_loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=settings.dp_sgd_noise_multiplier,
            max_grad_norm=settings.dp_sgd_clip_norm, poisson_sampling=True, noise_generator=noise)
    return module, private_optimizer, private_loader


class BalancedCrossEntropy(nn.Module):
    """Cross-entropy in which every class present weighs the same, whatever its prevalence.

    Equal to `nn.CrossEntropyLoss(weight=n / (k * n_c))`; weights are per sample, so a class
    absent from the site needs no entry.
    """

    class_weight: torch.Tensor

    def __init__(self, labels: Sequence[int]) -> None:
        super().__init__()
        counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long)).float()
        present = int((counts > 0).sum())
        self.register_buffer("class_weight", counts.sum() / (present * counts.clamp(min=1)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weight.to(logits.device)[target]
        losses = nn.functional.cross_entropy(logits, target, reduction="none")
        return (losses * weight).sum() / weight.sum()


def dataset_labels(dataset: Dataset) -> list[int]:
    """Class labels of a site's dataset (or of several, concatenated), without decoding images."""
    if isinstance(dataset, ConcatDataset):
        return [label for part in dataset.datasets for label in dataset_labels(part)]
    items = getattr(dataset, "data", None)  # MONAI datasets keep their undecoded item dicts
    if items is None:
        items = (dataset[i] for i in range(dataset_size(dataset)))
    return [int(item["label"]) for item in items]


def _assemble(policy: Policy, model_name: str, global_shared: Mapping[str, np.ndarray] | None,
              personal: Mapping[str, np.ndarray] | None, num_classes: int,
              settings: TrainSettings, seed: int) -> tuple[nn.Module, Partition]:
    """The seed's model with the received shared tensors and the site's personal ones loaded."""
    model = site_model(model_name, num_classes=num_classes, image_size=settings.image_size,
                       seed=seed, dp_sgd=settings.dp_sgd, in_channels=settings.in_channels)
    partition = policy.partition(model)
    if global_shared is not None:
        _load(model, global_shared, partition.shared, "the global model")
    if personal:
        # Names a site does not hold yet (it joined late) keep the seed's initial values.
        held = tuple(n for n in partition.personal if n in personal)
        _load(model, {n: personal[n] for n in held}, held, "this site's personal tensors")
    return model.to(settings.device), partition


def _personal_model(model_name: str, personal: Mapping[str, np.ndarray] | None,
                    start: Mapping[str, torch.Tensor], num_classes: int, settings: TrainSettings,
                    seed: int) -> nn.Module:
    """Ditto's personal model: the stored one, or on first use the received global (`start`)."""
    model = site_model(model_name, num_classes=num_classes, image_size=settings.image_size,
                       seed=seed, dp_sgd=settings.dp_sgd, in_channels=settings.in_channels)
    if personal and _has_personal_model(personal):
        stored = {n[len(PERSONAL_MODEL_PREFIX):]: t for n, t in personal.items()
                  if n.startswith(PERSONAL_MODEL_PREFIX)}
        _load(model, stored, tuple(model.state_dict()), "this site's Ditto model")
    else:
        model.load_state_dict(start)
    return model.to(settings.device)


def _has_personal_model(personal: Mapping[str, np.ndarray]) -> bool:
    return any(n.startswith(PERSONAL_MODEL_PREFIX) for n in personal)


def _load(model: nn.Module, tensors: Mapping[str, np.ndarray], expected: tuple[str, ...],
          what: str) -> None:
    """Copy `tensors` (exactly the `expected` names) into `model`, refusing what does not fit."""
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        raise ValueError(f"{what} does not fit this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (same model name and policy everywhere?)")
    state = model.state_dict()
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(state[name].shape) != tuple(np.shape(value)):
                raise ValueError(f"{what}: {name} has shape {tuple(np.shape(value))}, "
                                 f"the model expects {tuple(state[name].shape)}")
            state[name].copy_(torch.as_tensor(np.asarray(value)))


def _to_numpy(state: Mapping[str, torch.Tensor]) -> Arrays:
    return {n: t.detach().cpu().numpy().copy() for n, t in state.items()}


def _inputs(batch: Mapping[str, torch.Tensor], task: Task,
            device: str) -> tuple[torch.Tensor, torch.Tensor]:
    target = batch["label"] if task == "classification" else batch["mask"]
    return batch["image"].to(device), target.to(device)


def _loss(task: Task) -> nn.Module:
    if task == "classification":
        return nn.CrossEntropyLoss()
    return DiceLoss(to_onehot_y=True, softmax=True)


def dataset_size(dataset: Dataset) -> int:
    """Examples in a site's dataset: every one a site builds (MONAI's, their concatenations) is
    Sized, which torch's `Dataset` type does not say."""
    return len(cast(Sized, dataset))


def _require_examples(splits: Splits, split: str) -> Dataset:
    dataset = getattr(splits, split)
    if dataset_size(dataset) == 0:
        raise ValueError(f"site {splits.name!r}: the {split} split is empty; "
                         "check its data folder with `fedhealth site check`")
    return dataset

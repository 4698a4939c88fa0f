"""Local training and evaluation per policy, on a synthetic blob-vs-no-blob task held in tensors."""

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fedhealth.core.config import OPTIMIZER_NAMES, RunConfig
from fedhealth.core.models import build_model
from fedhealth.core.personalization import PERSONAL_MODEL_PREFIX, POLICY_NAMES, get_policy
from sites.pipeline_config import LUMA
from sites.training import (
    OPTIMIZERS,
    BalancedCrossEntropy,
    TrainSettings,
    classification_metrics,
    dataset_labels,
    evaluate_model,
    evaluate_site,
    fixed_sample,
    local_round,
    train_centrally,
)

SETTINGS = TrainSettings(local_epochs=3, batch_size=8, learning_rate=3e-3, device="cpu")


class Blobs(Dataset):
    """Noise images; label 1 carries a bright Gaussian blob (its disc is the segmentation mask)."""

    def __init__(self, n: int, *, seed: int, size: int = 64, contrast: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.images, self.masks = [], []
        for label in self.labels:
            cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g)
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            noise = 0.3 * torch.randn(size, size, generator=g)
            self.images.append((contrast * (noise + label * torch.exp(-d2 / 40.0)))[None].float())
            self.masks.append(((d2 < 36) * label)[None].float())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "mask": self.masks[i]}


@dataclass
class Site:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int = 2


@pytest.fixture(scope="module")
def site() -> Site:
    return Site("blobs", Blobs(32, seed=1), Blobs(8, seed=2), Blobs(32, seed=3))


def _round(policy: str, site: Site, **kwargs: object):
    return local_round(get_policy(policy), "tiny", splits=site, settings=SETTINGS, seed=0,
                       **{"global_shared": None, "personal": None, **kwargs})


PARAMETERS = [n for n, _ in build_model("tiny").named_parameters()]


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Squared distance over the trainable parameters both hold (BatchNorm statistics excluded)."""
    return float(sum(np.sum((a[n] - b[n]) ** 2) for n in PARAMETERS if n in a and n in b))


def test_training_beats_the_initial_model(site: Site) -> None:
    policy = get_policy("fedavg")
    before = evaluate_site(policy, "tiny", global_shared=None, personal=None, splits=site,
                           settings=SETTINGS)
    out = _round("fedavg", site)
    after = evaluate_site(policy, "tiny", global_shared=out.shared, personal=out.personal,
                          splits=site, settings=SETTINGS)
    assert after["accuracy"] >= 0.85 > before["accuracy"]
    assert after["loss"] < before["loss"]
    assert after["num-examples"] == 32 and out.num_examples == 32
    assert set(after) >= {"accuracy", "balanced_accuracy", "auc", "loss", "num-examples"}


def test_same_seed_same_update(site: Site) -> None:
    a, b = _round("fedbn", site), _round("fedbn", site)
    assert a.shared.keys() == b.shared.keys()
    assert all(np.array_equal(a.shared[n], b.shared[n]) for n in a.shared)
    c = _round("fedbn", site, server_round=2)  # another round shuffles differently
    assert not all(np.array_equal(a.shared[n], c.shared[n]) for n in a.shared)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_sends_exactly_its_shared_names(site: Site, name: str) -> None:
    policy = get_policy(name)
    part = policy.partition(build_model("tiny"))
    out = _round(name, site)
    assert list(out.shared) == list(part.shared)
    assert all(a.dtype == np.float32 for a in out.shared.values())
    own = {n for n in out.personal if not n.startswith(PERSONAL_MODEL_PREFIX)}
    assert own == set(part.personal)
    # The next round accepts what this one produced, and evaluation reports every metric.
    again = local_round(policy, "tiny", global_shared=out.shared, personal=out.personal,
                        splits=site, settings=replace(SETTINGS, local_epochs=1), seed=0,
                        server_round=2)
    metrics = evaluate_site(policy, "tiny", global_shared=again.shared, personal=again.personal,
                            splits=site, settings=SETTINGS)
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and metrics["num-examples"] == 32


def test_fedbn_evaluates_with_its_own_norm_layers(site: Site) -> None:
    out = _round("fedbn", site)
    policy = get_policy("fedbn")
    mine = evaluate_site(policy, "tiny", global_shared=out.shared, personal=out.personal,
                         splits=site, settings=SETTINGS)
    fresh = evaluate_site(policy, "tiny", global_shared=out.shared, personal=None, splits=site,
                          settings=SETTINGS)
    assert mine["loss"] != fresh["loss"]
    assert not any("norm" in n for n in out.shared)


def test_fedprox_pulls_towards_the_global(site: Site) -> None:
    start = _round("fedavg", site).shared
    sgd = replace(SETTINGS, optimizer="sgd", learning_rate=0.05, proximal_mu=5.0)
    free = local_round(get_policy("fedavg"), "tiny", global_shared=start, personal=None,
                       splits=site, settings=sgd, seed=0, server_round=2)
    pulled = local_round(get_policy("fedprox"), "tiny", global_shared=start, personal=None,
                         splits=site, settings=sgd, seed=0, server_round=2)
    assert 0 < _distance(pulled.shared, start) < 0.5 * _distance(free.shared, start)


def test_fedrep_trains_head_and_body(site: Site) -> None:
    first = _round("fedrep", site)
    out = local_round(get_policy("fedrep"), "tiny", global_shared=first.shared,
                      personal=first.personal, splits=site, settings=SETTINGS, seed=0,
                      server_round=2)
    head = "class_layers.out.weight"
    assert not np.array_equal(out.personal[head], first.personal[head])
    assert _distance(out.shared, first.shared) > 0
    assert {"head_train_loss", "train_loss"} <= set(out.metrics)


def test_ditto_keeps_a_personal_model_and_evaluates_it(site: Site) -> None:
    out = _round("ditto", site)
    mine = {n[len(PERSONAL_MODEL_PREFIX):]: t for n, t in out.personal.items()
            if n.startswith(PERSONAL_MODEL_PREFIX)}
    assert set(mine) == set(build_model("tiny").state_dict())
    assert _distance({n: mine[n] for n in out.shared}, out.shared) > 0
    model = build_model("tiny")
    model.load_state_dict({n: torch.as_tensor(t) for n, t in mine.items()})
    expected = evaluate_model(model, site.test, SETTINGS)
    got = evaluate_site(get_policy("ditto"), "tiny", global_shared=out.shared,
                        personal=out.personal, splits=site, settings=SETTINGS)
    assert got == expected


def test_train_centrally_serves_the_baselines(site: Site) -> None:
    model = train_centrally("tiny", site.train, SETTINGS, num_classes=2, seed=0, epochs=4)
    assert evaluate_model(model, site.test, SETTINGS)["accuracy"] >= 0.85


def test_unet_trains_with_dice(site: Site) -> None:
    seg = Site("seg", Blobs(16, seed=4, size=32), Blobs(4, seed=5, size=32),
               Blobs(16, seed=6, size=32))
    settings = replace(SETTINGS, image_size=32, local_epochs=3, learning_rate=1e-2)
    policy = get_policy("fedbn")
    before = evaluate_site(policy, "unet", global_shared=None, personal=None, splits=seg,
                           settings=settings)
    out = local_round(policy, "unet", global_shared=None, personal=None, splits=seg,
                      settings=settings, seed=0)
    after = evaluate_site(policy, "unet", global_shared=out.shared, personal=out.personal,
                          splits=seg, settings=settings)
    assert after["loss"] < before["loss"]
    assert 0.0 <= after["dice"] <= 1.0


def test_metrics_on_known_predictions() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics(logits, torch.tensor([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(1.0) and m["auc_defined"] == 1.0
    one_class = classification_metrics(logits, torch.tensor([1, 1, 1, 1]))
    assert one_class["auc"] == 0.5 and one_class["auc_defined"] == 0.0
    three = classification_metrics(torch.eye(3).repeat(2, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert three["auc"] == pytest.approx(1.0) and three["balanced_accuracy"] == 1.0


def test_bad_inputs_fail_clearly(site: Site) -> None:
    empty = Site("empty-hospital", Blobs(0, seed=0), Blobs(0, seed=0), Blobs(0, seed=0))
    with pytest.raises(ValueError, match="'empty-hospital'.*train split is empty"):
        _round("fedavg", empty)
    shared = _round("fedavg", site).shared
    shared.pop("class_layers.out.bias")
    with pytest.raises(ValueError, match="missing.*class_layers.out.bias"):
        _round("fedavg", site, global_shared=shared)
    with pytest.raises(ValueError, match="optimizer.*choose one of"):
        TrainSettings(optimizer="lbfgs")


def test_settings_from_the_run_config() -> None:
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    flower = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    config = RunConfig.from_flower({**flower, "local-epochs": 3, "optimizer": "sgd"})
    settings = TrainSettings.from_run_config(config)
    assert (settings.local_epochs, settings.optimizer) == (3, "sgd")
    assert settings.learning_rate == config.learning_rate
    assert settings.device in ("cpu", "cuda")


# ------------------------------------------------------------------ balanced loss
def test_balanced_cross_entropy_is_torchs_loss_with_inverse_frequency_class_weights() -> None:
    labels = torch.tensor([0] * 3 + [1] * 9)
    logits = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor([12 / (2 * 3), 12 / (2 * 9)]))
    assert BalancedCrossEntropy(labels.tolist())(logits, labels).item() == pytest.approx(
        expected(logits, labels).item())
    # a class this site lacks (2) has no say; labels it holds keep their equal weights
    three = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    assert BalancedCrossEntropy(labels.tolist())(three, labels).item() == pytest.approx(
        torch.nn.CrossEntropyLoss(weight=torch.tensor([2.0, 2 / 3, 1.0]))(three, labels).item())


def test_dataset_labels_reads_monai_items_without_decoding_and_any_dataset_by_item() -> None:
    from monai.data import Dataset as MonaiDataset
    from torch.utils.data import ConcatDataset

    undecodable = MonaiDataset([{"image": "/nonexistent.dcm", "label": k % 3} for k in range(5)])
    assert dataset_labels(ConcatDataset([undecodable, Blobs(4, seed=0)])) == [0, 1, 2, 0, 1,
                                                                               0, 1, 0, 1]


def test_balanced_loss_lifts_balanced_accuracy_on_a_site_with_one_rare_class() -> None:
    rare = Blobs(64, seed=4)
    keep = [i for i in range(len(rare)) if rare.labels[i] == 1 or i % 16 == 0]  # 4 of 32 negatives
    skewed = torch.utils.data.Subset(rare, keep)
    scores = {}
    for balanced in (False, True):
        settings = replace(SETTINGS, balanced_loss=balanced)
        model = train_centrally("tiny", skewed, settings, num_classes=2, seed=0, epochs=2)
        scores[balanced] = evaluate_model(model, Blobs(64, seed=5), settings)["balanced_accuracy"]
    assert scores[True] > scores[False] + 0.1, scores


def test_settings_take_the_run_configs_defaults_and_optimizers() -> None:
    assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)
    defaults, settings = RunConfig(), TrainSettings()
    assert (settings.local_epochs, settings.learning_rate, settings.optimizer,
            settings.batch_size) == (defaults.local_epochs, defaults.learning_rate,
                                     defaults.optimizer, defaults.batch_size)
    with pytest.raises(ValueError, match="learning-rate"):
        TrainSettings(learning_rate=-1.0)


class ColourBlobs(Blobs):
    """Blobs of one luma in two colours: red (label 1) or green (label 0), with the green one
    dimmer by the BT.601 weights, so a one-channel (luma) model sees the same image either way."""

    def __init__(self, n: int, *, seed: int) -> None:
        super().__init__(n, seed=seed)
        g = torch.Generator().manual_seed(seed + 100)
        red, green = LUMA[0], LUMA[1]
        for i, label in enumerate(self.labels):
            blob = self.images[i] - 0.3 * torch.randn(self.images[i].shape, generator=g)
            channels = 0.3 * torch.randn((3, *blob.shape[1:]), generator=g)
            if label:
                channels[0] += blob[0]
            else:
                channels[1] += blob[0] * red / green
            self.images[i] = channels


def test_a_three_channel_model_learns_what_only_colour_tells_apart() -> None:
    site = Site("colour", ColourBlobs(48, seed=1), ColourBlobs(16, seed=2), ColourBlobs(48, seed=3))
    luma = torch.tensor(LUMA)[:, None, None]
    means = [torch.stack([(site.test[i]["image"] * luma).sum(0).amax() for i in range(48)
                          if int(site.test[i]["label"]) == c]).mean() for c in (0, 1)]
    assert abs(float(means[0] - means[1])) < 0.1 * float(means[1])  # luma alone: alike
    rgb = replace(SETTINGS, in_channels=3, local_epochs=4)
    out = local_round(get_policy("fedavg"), "tiny", global_shared=None, personal=None,
                      splits=site, settings=rgb, seed=0)
    assert out.shared["features.0.conv.weight"].shape[1] == 3
    scored = evaluate_site(get_policy("fedavg"), "tiny", global_shared=out.shared,
                           personal=out.personal, splits=site, settings=rgb)
    assert scored["balanced_accuracy"] >= 0.8
    with pytest.raises(ValueError, match="in-channels"):
        RunConfig(in_channels=2)


def test_fixed_sample_is_the_same_subset_every_time_and_all_when_small() -> None:
    data = list(range(50))
    first, again = fixed_sample(data, 7), fixed_sample(data, 7)  # type: ignore[arg-type]
    picked = [first[i] for i in range(len(first))]
    assert len(picked) == 7 and picked == [again[i] for i in range(7)]
    assert picked == sorted(set(picked)) and picked != list(range(7))  # drawn, in order
    assert fixed_sample(data, 0) is data and fixed_sample(data, 50) is data  # type: ignore[arg-type]

"""The model zoo: MONAI networks every site builds identically from the run's seed.

Round 1 starts from `build_model(name, seed=run_seed)` at every site, so the aggregator never needs a
plaintext model and no weights are ever downloaded. All models take one 2D channel.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Norm
from monai.networks.nets import DenseNet121, UNet
from torch import nn

Task = Literal["classification", "segmentation"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo entry and what it predicts."""

    build: Callable[[int], torch.nn.Module]  # num_classes -> module
    task: Task


def _tiny(num_classes: int) -> torch.nn.Module:
    # Three MONAI conv blocks (conv, BatchNorm, ReLU, then 2x max pooling) and a max-pooled head
    # named like DenseNet's (`class_layers.out`), so FedBN and FedPer mean the same thing. A finding
    # is small and can be anywhere: max pooling keeps its signal where averaging dilutes it.
    blocks = [(Convolution(2, i, o, kernel_size=3, act="relu", norm=Norm.BATCH), nn.MaxPool2d(2))
              for i, o in ((1, 16), (16, 32), (32, 64))]
    head = nn.Sequential(OrderedDict(pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(),
                                     out=nn.Linear(64, num_classes)))
    return nn.Sequential(OrderedDict(features=nn.Sequential(*(m for b in blocks for m in b)),
                                     class_layers=head))


def _densenet121(num_classes: int) -> torch.nn.Module:
    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)


def _unet(num_classes: int) -> torch.nn.Module:
    # BatchNorm instead of MONAI's InstanceNorm default, so FedBN has something to keep local.
    return UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2, norm=Norm.BATCH)


ZOO: dict[str, ModelSpec] = {
    "densenet121": ModelSpec(_densenet121, "classification"),
    "tiny": ModelSpec(_tiny, "classification"),
    "unet": ModelSpec(_unet, "segmentation"),
}
MODEL_NAMES: tuple[str, ...] = tuple(ZOO)


def model_spec(name: str) -> ModelSpec:
    """The zoo entry for `name`, or an error listing the names there are."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return ZOO[name]


def build_model(name: str, *, num_classes: int = 2, image_size: int = 64,
                seed: int = 0) -> torch.nn.Module:
    """A freshly initialised zoo model, identical for the same (name, num_classes, seed) anywhere.

    `image_size` is checked, not used: the classifiers pool adaptively and UNet needs a multiple of 8.
    The global RNG is left untouched, so building a model never perturbs a caller's random stream.
    """
    spec = model_spec(name)
    if num_classes < 2:
        raise ValueError(f"model {name!r} needs num_classes >= 2, got {num_classes}")
    if spec.task == "segmentation" and image_size % 8:
        raise ValueError(f"model {name!r} needs an image size divisible by 8, got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(num_classes)

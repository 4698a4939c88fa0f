"""The model zoo: MONAI networks every site builds identically from the run's seed.

Round 1 starts from `build_model(name, seed=run_seed)` at every site, so the aggregator never needs a
plaintext model and no weights are ever downloaded. Models take `in_channels` (1 or 3, the run
config's `in-channels`); the `-3d` entries
are the same MONAI networks with `spatial_dims=3`, trained on a site's volumes (a CT/MR series or
an Enhanced object, see sites.series_volume) instead of its images. Nothing else differs: the
encrypted layout is whatever the state dict is, and every personalization policy partitions it
(FedBN keeps BatchNorm3d local as it keeps BatchNorm2d).
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Norm
from monai.networks.nets import DenseNet121, SegResNet, UNet
from torch import nn

Task = Literal["classification", "segmentation"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo entry and what it predicts."""

    build: Callable[[int, int], torch.nn.Module]  # (num_classes, in_channels) -> module
    task: Task
    spatial_dims: int = 2  # 3: the model takes volumes (channel, rows, columns, slices)


def _tiny(num_classes: int, in_channels: int, spatial_dims: int = 2,
          widths: tuple[int, ...] = (16, 32, 64)) -> torch.nn.Module:
    # Three MONAI conv blocks (conv, BatchNorm, ReLU, then 2x max pooling) and a max-pooled head
    # named like DenseNet's (`class_layers.out`), so FedBN and FedPer mean the same thing. A finding
    # is small and can be anywhere: max pooling keeps its signal where averaging dilutes it.
    pool, global_pool = ((nn.MaxPool2d, nn.AdaptiveMaxPool2d) if spatial_dims == 2
                         else (nn.MaxPool3d, nn.AdaptiveMaxPool3d))
    blocks = [(Convolution(spatial_dims, i, o, kernel_size=3, act="relu", norm=Norm.BATCH),
               pool(2)) for i, o in zip((in_channels, *widths[:-1]), widths)]
    head = nn.Sequential(OrderedDict(pool=global_pool(1), flatten=nn.Flatten(),
                                     out=nn.Linear(widths[-1], num_classes)))
    return nn.Sequential(OrderedDict(features=nn.Sequential(*(m for b in blocks for m in b)),
                                     class_layers=head))


def _tiny3d(num_classes: int, in_channels: int) -> torch.nn.Module:
    # Narrower than the 2D one: a 32^3 volume has 8 times the pixels of a 64^2 image, and 8/16/32
    # channels keep a CPU round at seconds and the encrypted reply small.
    return _tiny(num_classes, in_channels, spatial_dims=3, widths=(8, 16, 32))


def _densenet121(num_classes: int, in_channels: int, spatial_dims: int = 2) -> torch.nn.Module:
    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)


def _unet(num_classes: int, in_channels: int) -> torch.nn.Module:
    # BatchNorm instead of MONAI's InstanceNorm default, so FedBN has something to keep local.
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2, norm=Norm.BATCH)


def _segresnet3d(num_classes: int, in_channels: int) -> torch.nn.Module:
    # MONAI's SegResNet (as in its BraTS tutorials) at a CPU width, with BatchNorm for FedBN.
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=in_channels, out_channels=num_classes,
                     blocks_down=(1, 2, 2), blocks_up=(1, 1), norm="BATCH")


ZOO: dict[str, ModelSpec] = {
    "densenet121": ModelSpec(_densenet121, "classification"),
    "tiny": ModelSpec(_tiny, "classification"),
    "unet": ModelSpec(_unet, "segmentation"),
    "tiny-3d": ModelSpec(_tiny3d, "classification", spatial_dims=3),
    "densenet121-3d": ModelSpec(lambda n, c: _densenet121(n, c, spatial_dims=3), "classification",
                                spatial_dims=3),
    "segresnet-3d": ModelSpec(_segresnet3d, "segmentation", spatial_dims=3),
}
MODEL_NAMES: tuple[str, ...] = tuple(ZOO)


def model_spec(name: str) -> ModelSpec:
    """The zoo entry for `name`, or an error listing the names there are."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return ZOO[name]


def build_model(name: str, *, num_classes: int = 2, image_size: int = 64, in_channels: int = 1,
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
        return spec.build(num_classes, in_channels)

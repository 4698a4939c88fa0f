"""Policies partition a model's state dict into shared and personal names, correctly per policy."""

import pytest
import torch
from torch import nn

from fedhealth.core.models import build_model
from fedhealth.core.personalization import (
    POLICY_NAMES,
    Partition,
    get_policy,
    head_modules,
    norm_modules,
)

#: Each zoo classifier's head as FedPer and FedRep keep it: its last convolution and what follows.
HEAD_MODULES = {
    "tiny": ("features.4.conv", "features.4.adn.N", "class_layers.out"),
    "densenet121": ("features.denseblock4.denselayer16.layers.conv2", "features.norm5",
                    "class_layers.out"),
}


@pytest.fixture(scope="module", params=list(HEAD_MODULES))
def zoo_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model(zoo_name: str) -> nn.Module:
    return build_model(zoo_name)


def _entries_under(model: nn.Module, modules: tuple[str, ...]) -> set[str]:
    return {n for n in model.state_dict() if n.startswith(tuple(f"{m}." for m in modules))}


def _batchnorm_entries(model: nn.Module) -> set[str]:
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    return {n for n in model.state_dict() if n.startswith(prefixes)}


def _counters(model: nn.Module) -> set[str]:
    return {n for n, t in model.state_dict().items() if not torch.is_floating_point(t)}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_partition_covers_the_state_dict_once_in_order(model: nn.Module, name: str) -> None:
    part = get_policy(name).partition(model)
    state = list(model.state_dict())
    assert not set(part.shared) & set(part.personal)
    assert set(part.shared) | set(part.personal) == set(state)
    assert list(part.shared) == [n for n in state if n in part.shared]
    assert list(part.personal) == [n for n in state if n in part.personal]
    # Only real numbers go through CKKS.
    assert all(torch.is_floating_point(model.state_dict()[n]) for n in part.shared)


def test_fedbn_keeps_every_batchnorm_entry(model: nn.Module) -> None:
    personal = set(get_policy("fedbn").partition(model).personal)
    bn = _batchnorm_entries(model)
    assert personal == bn
    assert any(n.endswith("running_var") for n in bn) and any(n.endswith("weight") for n in bn)


@pytest.mark.parametrize("name", ["fedper", "fedrep"])
def test_fedper_and_fedrep_keep_the_last_convolution_and_what_follows(
        zoo_name: str, model: nn.Module, name: str) -> None:
    head = HEAD_MODULES[zoo_name]
    assert tuple(head_modules(model)) == head
    personal = set(get_policy(name).partition(model).personal)
    assert personal == _entries_under(model, head) | _counters(model)
    # The head holds a convolution, a normalisation layer and the classifier: a non-linear rule of
    # its own, not a linear layer on shared features.
    kinds = [type(dict(model.named_modules())[m]) for m in head]
    assert issubclass(kinds[0], nn.modules.conv._ConvNd) and kinds[-1] is nn.Linear
    assert any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "ditto"])
def test_global_policies_keep_only_integer_counters(model: nn.Module, name: str) -> None:
    counters = _counters(model)
    assert counters and all(n.endswith("num_batches_tracked") for n in counters)
    assert set(get_policy(name).partition(model).personal) == counters


def test_split_returns_the_tensors_of_each_side() -> None:
    model = build_model("tiny")
    _, personal = get_policy("fedper").split(model)
    assert set(personal) - _counters(model) == (_entries_under(model, HEAD_MODULES["tiny"])
                                                - _counters(model))
    assert torch.equal(personal["class_layers.out.weight"],
                       model.state_dict()["class_layers.out.weight"])
    with pytest.raises(TypeError, match="model itself"):
        get_policy("fedper").split(model.state_dict())  # type: ignore[arg-type]


def test_partition_split_refuses_a_foreign_state() -> None:
    with pytest.raises(ValueError, match="missing"):
        Partition(shared=("a",), personal=("b",)).split({"a": 1, "c": 2})


class _HeadFirst(nn.Module):
    """Declares its head before its body: registration order would pick the wrong layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_head_is_found_by_data_flow_not_registration_order() -> None:
    model = _HeadFirst()
    assert head_modules(model) == ["body.1", "body.2", "head"]
    assert norm_modules(model) == ["body.2"]
    assert model.training  # the probe pass leaves the mode as it found it


def test_unet_head_is_the_output_convolution() -> None:
    model = build_model("unet", num_classes=3)
    (name,) = head_modules(model)
    head = dict(model.named_modules())[name]
    assert isinstance(head, nn.modules.conv._ConvNd) and head.out_channels == 3
    assert set(get_policy("fedbn").partition(model).personal) == _batchnorm_entries(model)


def test_unknown_policy_lists_the_names() -> None:
    with pytest.raises(ValueError, match="fedavg, fedprox, fedbn, fedper, fedrep, ditto"):
        get_policy("scaffold")

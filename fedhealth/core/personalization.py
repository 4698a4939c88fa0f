"""Personalization policies as a partition of a model's state dict into shared and personal names.

Shared tensors are encrypted and averaged across sites; personal tensors never leave the site.
Integer buffers (BatchNorm's `num_batches_tracked`) are personal under every policy: CKKS carries
real numbers, and these counters are bookkeeping that BatchNorm ignores when `momentum` is set
(it is, 0.1, in every zoo model), so averaging them would add bytes and nothing else.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

T = TypeVar("T")

#: Key prefix of Ditto's whole personal model inside a site's personal tensors.
PERSONAL_MODEL_PREFIX = "ditto/"

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Partition:
    """Which state-dict names a site sends (shared) and keeps (personal), each in state-dict order."""

    shared: tuple[str, ...]
    personal: tuple[str, ...]

    def split(self, state: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
        """(shared, personal) sub-dicts of `state`, which must hold exactly the partitioned names."""
        missing = [n for n in (*self.shared, *self.personal) if n not in state]
        extra = set(state) - set(self.shared) - set(self.personal)
        if missing or extra:
            raise ValueError(f"state dict does not match the partition: missing {missing[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        return ({n: state[n] for n in self.shared}, {n: state[n] for n in self.personal})


@dataclass(frozen=True)
class Policy:
    """One personalization policy: what stays on site and how a site trains.

    personal_layers: which float tensors stay on site ("none", the normalisation layers, or the
        head: see `head_modules`).
    proximal: add mu/2 ||w - w_global||^2 to the local loss of the shared model (FedProx).
    head_first: train the head with the body frozen, then the body with the head frozen (FedRep).
    personal_model: also keep and train a whole personal model pulled towards the global (Ditto).
    """

    name: str
    personal_layers: Literal["none", "norm", "head"] = "none"
    proximal: bool = False
    head_first: bool = False
    personal_model: bool = False

    def partition(self, model: nn.Module) -> Partition:
        """Partition `model`'s state dict by this policy."""
        state = model.state_dict()
        personal = {n for n, t in state.items() if not torch.is_floating_point(t)}
        if self.personal_layers == "norm":
            personal |= _names_under(model, norm_modules(model))
        elif self.personal_layers == "head":
            personal |= _names_under(model, head_modules(model))
        return Partition(shared=tuple(n for n in state if n not in personal),
                         personal=tuple(n for n in state if n in personal))

    def split(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`model`'s state dict as (shared, personal) tensors."""
        if not isinstance(model, nn.Module):
            raise TypeError("Policy.split takes the model itself, not its state dict: norm layers "
                            "and the head are found from its modules")
        return self.partition(model).split(model.state_dict())


POLICIES: dict[str, Policy] = {
    "fedavg": Policy("fedavg"),
    "fedprox": Policy("fedprox", proximal=True),
    "fedbn": Policy("fedbn", personal_layers="norm"),
    "fedper": Policy("fedper", personal_layers="head"),
    "fedrep": Policy("fedrep", personal_layers="head", head_first=True),
    "ditto": Policy("ditto", personal_model=True),
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def get_policy(name: str) -> Policy:
    """The policy called `name`, or an error listing the names there are."""
    if name not in POLICIES:
        raise ValueError(f"unknown personalization policy {name!r}: "
                         f"choose one of {', '.join(POLICY_NAMES)}")
    return POLICIES[name]


def norm_modules(model: nn.Module) -> list[str]:
    """Names of every normalisation module (BatchNorm, InstanceNorm, GroupNorm, LayerNorm)."""
    return [n for n, m in model.named_modules() if isinstance(m, _NORM_TYPES)]


def head_modules(model: nn.Module) -> list[str]:
    """The head FedPer and FedRep keep on site: the last convolution a forward pass runs and every
    module with parameters after it (its normalisation, the classifier), in forward order.

    Why more than the last linear layer: a site whose labelling protocol is not monotone in what
    the shared features rank (one hospital calls dense nodules benign, the others call every
    nodule a finding) needs a non-linearity of its own; a linear layer on top of shared,
    max-pooled features cannot learn it, and FedPer and FedRep then scored that site at chance
    (0.50-0.53). With the last convolution on site too they scored it as `local` does (0.67-0.77)
    while sharing the rest. A segmentation network ends in its output convolution, so its head is
    that convolution alone.

    Found by tracing one forward pass on a zero image rather than trusting registration order, so a
    model that declares its head before its body is still handled.
    """
    order: list[str] = []
    modules = dict(model.named_modules())
    hooks = [m.register_forward_hook(lambda *_, name=n: order.append(name))
             for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))]
    first_conv = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    probe = torch.zeros(2, first_conv.in_channels, *([64] * (first_conv.weight.dim() - 2)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe.to(first_conv.weight.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    last_conv = max(i for i, name in enumerate(order)
                    if isinstance(modules[name], nn.modules.conv._ConvNd))
    return list(dict.fromkeys(order[last_conv:]))


def _names_under(model: nn.Module, modules: list[str]) -> set[str]:
    prefixes = tuple(f"{m}." for m in modules)
    return {n for n in model.state_dict() if n.startswith(prefixes)}

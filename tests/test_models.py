"""The model zoo: every name builds, deterministically, and fails clearly on an unknown name."""

import subprocess
import sys

import pytest
import torch

from fedhealth.core.models import MODEL_NAMES, build_model, model_spec


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_model_other_seed_other_model(name: str) -> None:
    assert _same(build_model(name, seed=3), build_model(name, seed=3))
    assert not _same(build_model(name, seed=3), build_model(name, seed=4))


def test_identical_across_processes() -> None:
    # Every site builds round 1 in its own process: the weights must not depend on the process.
    code = ("import torch; from fedhealth.core.models import build_model; "
            "print(sum(float(t.double().sum()) for t in build_model('tiny', seed=5)"
            ".state_dict().values()))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    here = sum(float(t.double().sum()) for t in build_model("tiny", seed=5).state_dict().values())
    assert float(other) == here


def test_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model("tiny", seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("name", "classes"), [("tiny", 3), ("densenet121", 2)])
def test_classifiers_output_one_logit_per_class(name: str, classes: int) -> None:
    model = build_model(name, num_classes=classes).eval()
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, classes)
    assert model_spec(name).task == "classification"


def test_unet_segments_at_the_input_size() -> None:
    model = build_model("unet", num_classes=2, image_size=32).eval()
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    assert model_spec("unet").task == "segmentation"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # FedBN has a role


def test_tiny_is_small_and_has_batchnorm() -> None:
    model = build_model("tiny")
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_bad_requests_name_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="densenet121, tiny, unet"):
        build_model("resnet")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("tiny", num_classes=1)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("unet", image_size=60)


@pytest.mark.parametrize(("name", "output"), [("tiny-3d", (2, 2)), ("densenet121-3d", (2, 2)),
                                              ("segresnet-3d", (2, 2, 32, 32, 32))])
def test_3d_models_take_volumes_and_fedbn_keeps_their_batchnorm3d(name: str,
                                                                   output: tuple[int, ...]) -> None:
    from fedhealth.core.personalization import get_policy

    model = build_model(name, image_size=32).eval()
    assert model_spec(name).spatial_dims == 3
    assert model(torch.zeros(2, 1, 32, 32, 32)).shape == output
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm3d)}
    personal = set(get_policy("fedbn").partition(model).personal)
    assert norms and all(f"{n}.weight" in personal and f"{n}.running_var" in personal
                         for n in norms)

"""Typed run configuration: Flower's flat run config turned into checked values, once.

Both the ServerApp and the ClientApp read the same `[tool.flwr.app.config]`; a missing, mistyped,
unknown (a policy, model, preset or optimizer name) or out-of-range field fails here, when the
config is built, with the field's name and its choices, instead of deep inside a round.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, get_type_hints

if TYPE_CHECKING:  # Flower's records load with the ServerApp/ClientApp, not with every RunConfig
    from flwr.app import ConfigRecord

# The optimizers a site can train with; sites.training maps each name to its torch class.
OPTIMIZER_NAMES: tuple[str, ...] = ("adam", "sgd")
# Smallest model input every zoo model takes: DenseNet121 shrinks its input 32-fold.
MIN_IMAGE_SIZE = 32
# What a model can take: greyscale (colour as its luma) or RGB (sites.pipeline_config).
IN_CHANNELS: tuple[int, ...] = (1, 3)


class ConfigError(ValueError):
    """A run config field is missing, has the wrong type, an unknown name or a value out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of one federation run.

    The defaults here and `[tool.flwr.app.config]` in pyproject.toml are the same values (a test
    holds them together): the wheel has no pyproject, `flwr run` reads only pyproject.

    expected_sites: sites the ServerApp waits for before round 0, up to `join_timeout` seconds;
        0 starts as soon as `min_sites` are connected. Flower samples from whoever is connected,
        so without this wait a site that joins a second late sits out round 0.
    balanced_loss: weight each class equally in a site's training loss, whatever its prevalence
        there; for sites so skewed that a model predicts only their majority class.
    in_channels: the channels a model takes: 1 (greyscale; colour images as their BT.601 luma)
        or 3 (RGB; greyscale repeated), what the site pipeline makes of every image.
    volume_depth: slices of the grid a 3D model's volumes are resized to (in plane: image_size);
        unused by 2D models. The model name says whether it is 3D (fedhealth.core.models).
    max_site_weight: the largest share a_k of the global any one site gets from the census of
        sample counts, whatever count it claims (1: no cap); the excess goes to the others.
    progress_test_images: how many of its test images (a fixed, seeded sample) a site scores in
        the rounds before the last, whose scores only draw the learning curve; the last round
        always scores the whole test split (0: the whole split every round). Scoring a large
        test split every round is most of a small model's round on a CPU.
    dp_noise_multiplier: client-level differential privacy (0: off). Every site clips the delta
        of its shared tensors from the model it started the round from to L2 norm
        `dp_clip_norm` and adds its share of Gaussian noise, so the decrypted sum carries noise
        of sd `dp_noise_multiplier * dp_clip_norm` per site's weight (sites.update_privacy).
        Needs `uniform_weights`: the sensitivity of a weighted sum is the largest a_k, which no
        site can check.
    dp_delta: the delta every epsilon is stated at (fedhealth.core.privacy_accounting).
    dp_sgd_noise_multiplier: sample-level DP-SGD inside each site's training with Opacus (0:
        off): per-sample gradients clipped to `dp_sgd_clip_norm`, BatchNorm replaced by
        GroupNorm. Not with the proximal policies (Opacus replaces each gradient by its noisy
        clipped per-sample sum, which would drop the proximal term).
    """

    num_server_rounds: int = 8
    policy: str = "fedbn"
    encrypted: bool = True
    crypto_preset: str = "default"
    model: str = "tiny"
    image_size: int = 64
    in_channels: int = 1
    volume_depth: int = 32
    seed: int = 0
    min_sites: int = 2
    expected_sites: int = 0
    join_timeout: float = 300.0
    fraction_train: float = 1.0
    local_epochs: int = 4
    batch_size: int = 16
    optimizer: str = "adam"
    learning_rate: float = 0.003
    proximal_mu: float = 0.01
    balanced_loss: bool = False
    uniform_weights: bool = False
    max_site_weight: float = 1.0
    progress_test_images: int = 256
    dp_noise_multiplier: float = 0.0
    dp_clip_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_sgd_noise_multiplier: float = 0.0
    dp_sgd_clip_norm: float = 1.0
    data_dir: str = ""
    key_dir: str = ""
    state_dir: str = ""
    out_dir: str = ""
    resume: bool = False

    def __post_init__(self) -> None:
        _check_names(self)
        _check_ranges(self)
        _check_privacy(self)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> "RunConfig":
        """Build from Flower's run config (keys use dashes, e.g. `num-server-rounds`)."""
        values: dict[str, object] = {}
        kinds = get_type_hints(cls)  # the classes themselves, not the annotations' text
        for field in fields(cls):
            key = _key(field.name)
            if key not in run_config:
                raise ConfigError(
                    f"run config field '{key}' is missing: add it under "
                    "[tool.flwr.app.config] in pyproject.toml or pass --run-config"
                )
            values[field.name] = _coerce(key, run_config[key], kinds[field.name])
        return cls(**values)  # type: ignore[arg-type]

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The inverse of `from_flower`, for `run_simulation` and `flwr run --run-config`."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def to_record(self) -> "ConfigRecord":
        """The same values as a ConfigRecord, to send to sites."""
        from flwr.app import ConfigRecord

        return ConfigRecord({key: value for key, value in self.to_flower().items()})


def _key(name: str) -> str:
    """The field as a user writes it in `--run-config` and pyproject.toml."""
    return name.replace("_", "-")


def _check_names(config: RunConfig) -> None:
    """Every name field is one the code knows; the lists come from where the names are defined."""
    # The zoo and the policies import torch and MONAI: only when a config is built, never at import.
    from fedhealth.core.crypto.presets import PRESETS
    from fedhealth.core.models import MODEL_NAMES
    from fedhealth.core.personalization import POLICY_NAMES

    choices = {"policy": POLICY_NAMES, "model": MODEL_NAMES, "crypto_preset": tuple(PRESETS),
               "optimizer": OPTIMIZER_NAMES}
    for name, known in choices.items():
        value = getattr(config, name)
        if value not in known:
            raise ConfigError(f"run config field '{_key(name)}' is {value!r}: choose one of "
                              f"{', '.join(known)}")


def _check_ranges(config: RunConfig) -> None:
    """Values a round would fail on (or silently misuse), refused with the range they must be in."""
    rules = {
        "num_server_rounds": (config.num_server_rounds >= 1, ">= 1"),
        "image_size": (config.image_size >= MIN_IMAGE_SIZE, f">= {MIN_IMAGE_SIZE}"),
        "volume_depth": (config.volume_depth >= MIN_IMAGE_SIZE, f">= {MIN_IMAGE_SIZE}"),
        "in_channels": (config.in_channels in IN_CHANNELS,
                        f"one of {', '.join(map(str, IN_CHANNELS))} (greyscale or RGB)"),
        "seed": (config.seed >= 0, ">= 0"),
        "min_sites": (config.min_sites >= 1, ">= 1"),
        "expected_sites": (config.expected_sites >= 0, ">= 0 (0: do not wait)"),
        "join_timeout": (config.join_timeout >= 0, ">= 0 seconds"),
        "fraction_train": (0 < config.fraction_train <= 1, "in (0, 1]"),
        "max_site_weight": (0 < config.max_site_weight <= 1, "in (0, 1]"),
        "local_epochs": (config.local_epochs >= 1, ">= 1"),
        "progress_test_images": (config.progress_test_images >= 0,
                                 ">= 0 (0: the whole test split every round)"),
        "batch_size": (config.batch_size >= 1, ">= 1"),
        "learning_rate": (config.learning_rate > 0, "> 0"),
        "proximal_mu": (config.proximal_mu >= 0, ">= 0"),
        "dp_noise_multiplier": (config.dp_noise_multiplier >= 0, ">= 0 (0: no client-level DP)"),
        "dp_clip_norm": (config.dp_clip_norm > 0, "> 0"),
        "dp_delta": (0 < config.dp_delta < 1, "in (0, 1)"),
        "dp_sgd_noise_multiplier": (config.dp_sgd_noise_multiplier >= 0, ">= 0 (0: no DP-SGD)"),
        "dp_sgd_clip_norm": (config.dp_sgd_clip_norm > 0, "> 0"),
    }
    for name, (valid, expected) in rules.items():
        if not valid:
            raise ConfigError(f"run config field '{_key(name)}' is {getattr(config, name)!r}: "
                              f"it must be {expected}")


def _check_privacy(config: RunConfig) -> None:
    """Differential privacy settings that would hold no guarantee, refused with the fix."""
    from fedhealth.core.personalization import get_policy

    if config.dp_noise_multiplier > 0 and not config.uniform_weights:
        raise ConfigError("run config field 'dp-noise-multiplier' is "
                          f"{config.dp_noise_multiplier!r} but 'uniform-weights' is false: "
                          "client-level DP sizes every site's noise by its weight a_k = 1/K, "
                          "so set uniform-weights = true (as Flower's DP strategies average "
                          "unweighted)")
    policy = get_policy(config.policy)
    if config.dp_sgd_noise_multiplier > 0 and (policy.proximal or policy.personal_model):
        raise ConfigError("run config field 'dp-sgd-noise-multiplier' is "
                          f"{config.dp_sgd_noise_multiplier!r} with policy '{config.policy}': "
                          "DP-SGD replaces each gradient by its clipped, noisy per-sample sum, "
                          "which drops the proximal term; choose fedavg, fedbn, fedper or fedrep")


def _coerce(key: str, value: object, kind: type) -> object:
    """Accept ints for floats (TOML writes `1` for `1.0`); refuse everything else that differs."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"run config field '{key}' must be true or false, got {value!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run config field '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value

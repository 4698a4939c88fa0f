"""Typed run configuration: Flower's flat run config turned into checked values, once.

Both the ServerApp and the ClientApp read the same `[tool.flwr.app.config]`; a missing or
mistyped field fails here with the field's name instead of deep inside a round.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields

from flwr.app import ConfigRecord


class ConfigError(ValueError):
    """A run config field is missing or has the wrong type."""


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
    """

    num_server_rounds: int = 3
    policy: str = "fedbn"
    encrypted: bool = True
    crypto_preset: str = "default"
    model: str = "tiny"
    image_size: int = 64
    seed: int = 0
    min_sites: int = 2
    expected_sites: int = 0
    join_timeout: float = 300.0
    fraction_train: float = 1.0
    local_epochs: int = 1
    batch_size: int = 16
    optimizer: str = "adam"
    learning_rate: float = 0.001
    proximal_mu: float = 0.01
    balanced_loss: bool = False
    uniform_weights: bool = False
    data_dir: str = ""
    key_dir: str = ""
    state_dir: str = ""
    out_dir: str = ""
    resume: bool = False

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> "RunConfig":
        """Build from Flower's run config (keys use dashes, e.g. `num-server-rounds`)."""
        values: dict[str, object] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key not in run_config:
                raise ConfigError(
                    f"run config field '{key}' is missing: add it under "
                    "[tool.flwr.app.config] in pyproject.toml or pass --run-config"
                )
            values[field.name] = _coerce(key, run_config[key], field.type)
        return cls(**values)  # type: ignore[arg-type]

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The inverse of `from_flower`, for `run_simulation` and `flwr run --run-config`."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def to_record(self) -> ConfigRecord:
        """The same values as a ConfigRecord, to send to sites."""
        return ConfigRecord(self.to_flower())


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

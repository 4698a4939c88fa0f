"""The run config: one set of defaults, and clear errors for a missing or mistyped field."""

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from fedhealth.core.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _app_config() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_app_config_equals_the_code_defaults() -> None:
    assert _app_config() == RunConfig().to_flower()


def test_round_trips_through_a_config_record() -> None:
    config = replace(RunConfig(), policy="ditto", learning_rate=0.05, encrypted=False)
    assert RunConfig.from_flower(config.to_record()) == config


def test_missing_field_is_named_with_where_to_set_it() -> None:
    values = _app_config()
    del values["crypto-preset"]
    with pytest.raises(ConfigError, match=r"'crypto-preset' is missing.*\[tool.flwr.app.config\]"):
        RunConfig.from_flower(values)


@pytest.mark.parametrize(("key", "value"), [("num-server-rounds", "3"), ("encrypted", 1),
                                            ("seed", True), ("learning-rate", "fast")])
def test_mistyped_field_is_refused(key: str, value: object) -> None:
    values = {**_app_config(), key: value}
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        RunConfig.from_flower(values)


def test_integer_is_accepted_for_a_float_field() -> None:
    assert RunConfig.from_flower({**_app_config(), "learning-rate": 1}).learning_rate == 1.0

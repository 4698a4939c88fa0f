"""The run config: one set of defaults, and clear errors for a missing or mistyped field."""

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from fedhealth.core.config import OPTIMIZER_NAMES, ConfigError, RunConfig

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


@pytest.mark.parametrize(("key", "typo", "choices"), [
    ("policy", "fedbm", "fedavg, fedprox, fedbn, fedper, fedrep, ditto"),
    ("model", "densenet", "densenet121, tiny, unet, tiny-3d, densenet121-3d, segresnet-3d"),
    ("crypto-preset", "defualt", "default, compact, nvflare, packed"),
    ("optimizer", "adamw", "adam, sgd"),
])
def test_unknown_name_is_refused_naming_the_field_and_the_choices(key: str, typo: str,
                                                                  choices: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}' is '{typo}': choose one of {choices}$"):
        RunConfig.from_flower({**_app_config(), key: typo})
    with pytest.raises(ConfigError, match=f"'{key}' is '{typo}'"):
        RunConfig(**{key.replace("-", "_"): typo})


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("num-server-rounds", 0, ">= 1"), ("fraction-train", 0.0, r"in \(0, 1\]"),
    ("fraction-train", 1.5, r"in \(0, 1\]"), ("learning-rate", 0.0, "> 0"),
    ("learning-rate", -0.1, "> 0"), ("local-epochs", 0, ">= 1"), ("batch-size", 0, ">= 1"),
    ("min-sites", 0, ">= 1"), ("expected-sites", -1, ">= 0"), ("join-timeout", -5.0, ">= 0"),
    ("proximal-mu", -0.01, ">= 0"), ("image-size", 8, ">= 32"), ("seed", -1, ">= 0"),
])
def test_value_out_of_range_is_refused_with_the_range(key: str, value: object,
                                                      expected: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}' is {value!r}: it must be {expected}"):
        RunConfig.from_flower({**_app_config(), key: value})


def test_edges_of_the_ranges_are_accepted() -> None:
    config = RunConfig(num_server_rounds=1, fraction_train=1.0, learning_rate=1e-9, local_epochs=1,
                       batch_size=1, min_sites=1, expected_sites=0, join_timeout=0.0,
                       proximal_mu=0.0, image_size=32, seed=0)
    assert RunConfig.from_flower(config.to_flower()) == config


def test_optimizer_names_are_the_ones_sites_train_with() -> None:
    from sites.training import OPTIMIZERS

    assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)

from pathlib import Path

import pytest
import yaml
from fibreflow.core.config import load_config, parse_overrides
from fibreflow.core.db import DbConfig
from fibreflow.core.errors import ConfigError
from fibreflow.core.tracking import TrackingConfig
from fibreflow.datasets.config import DataConfig
from fibreflow.datasets.embed import EmbedConfig
from fibreflow.datasets.seed import SeedConfig
from fibreflow.eval.config import EvalConfig
from fibreflow.eval.gates import GatesConfig
from fibreflow.monitor.capacity import CapacityConfig
from fibreflow.monitor.config import MonitoringConfig
from fibreflow.registry.registry import RegistryConfig
from fibreflow.serving.config import ServingConfig
from fibreflow.training.config import Catalogue
from fibreflow.training.tune import TuneConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODELS = {
    "db": DbConfig,
    "seed": SeedConfig,
    "data": DataConfig,
    "embed": EmbedConfig,
    "models": Catalogue,
    "tracking": TrackingConfig,
    "tune": TuneConfig,
    "gates": GatesConfig,
    "eval": EvalConfig,
    "registry": RegistryConfig,
    "serving": ServingConfig,
    "monitoring": MonitoringConfig,
    "capacity": CapacityConfig,
}


def test_every_shipped_config_parses() -> None:
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert shipped == set(MODELS), "a config file without a model (or a model without a file)"
    for name, model in MODELS.items():
        load_config(model, name)


def test_the_shipped_clients_of_the_router_ask_for_a_model_it_serves() -> None:
    served = {e.model for e in load_config(ServingConfig, "serving").router.experiments}
    assert load_config(EvalConfig, "eval").endpoints["router"].model in served
    assert load_config(MonitoringConfig, "monitoring").router.model in served


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scael": 3}, "scael"),  # unknown key is named
        ({"scale": "lots"}, "scale"),  # ill-typed key is named
        ({"as_of": "not-a-date"}, "as_of"),
    ],
)
def test_bad_seed_config_names_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SeedConfig, "seed", overrides)


def test_nested_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"terminology\.phrasing_per_term"):
        load_config(DataConfig, "data", {"terminology.phrasing_per_term": 2})


def test_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["a.b=3", "c=x", "d=[1, 2]", "e=true"]) == {
        "a.b": 3,
        "c": "x",
        "d": [1, 2],
        "e": True,
    }
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_overrides(["novalue"])


def test_override_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        load_config(SeedConfig, "seed", {"scale.x": 1})


def test_overlapping_templates_are_refused() -> None:
    tree = yaml.safe_load((CONFIGS / "data.yaml").read_text())
    same = tree["terminology"]["train_templates"][0]
    with pytest.raises(ConfigError, match="also appears"):
        load_config(DataConfig, "data", {"terminology.test_templates": [same]})


def test_embed_table_must_be_an_identifier() -> None:
    with pytest.raises(ConfigError, match="table"):
        load_config(EmbedConfig, "embed", {"table": "x; DROP TABLE poles"})

"""Experiment/trainer registry: discovery, lookups with suggestions, duplicate and bad registrations."""

import dataclasses

import pytest

from jaxlab import registry
from jaxlab.registry import RegistryError, get_experiment, register_experiment, register_trainer


@dataclasses.dataclass(frozen=True)
class _Cfg:
    x: int = 1


def test_discovery_finds_experiment_modules_and_quick_configs_validate():
    table = registry.experiments()
    assert "ssm-hippo" in table
    for name, exp in table.items():
        assert exp.description and exp.paper, name
        assert dataclasses.is_dataclass(exp.quick) and exp.quick.__dataclass_params__.frozen, name
        exp.config_cls()  # the full-size default must construct (and validate)
        assert exp.default_config(True) is exp.quick


def test_unknown_name_suggests_close_ones():
    with pytest.raises(RegistryError, match=r"unknown experiment 'ssm_hippo'; did you mean ssm-hippo\?"):
        get_experiment("ssm_hippo")
    with pytest.raises(RegistryError, match=r"unknown trainer 'zzz'"):
        registry.get_trainer("zzz")


def test_duplicate_and_invalid_registrations_are_rejected(monkeypatch):
    monkeypatch.setattr(registry, "_EXPERIMENTS", {})
    monkeypatch.setattr(registry, "_TRAINERS", {})

    @register_experiment("dup", description="d", paper="p", quick=_Cfg())
    def first(cfg, ctx):
        return None

    with pytest.raises(RegistryError, match="registered twice"):
        @register_experiment("dup", description="d", paper="p", quick=_Cfg())
        def second(cfg, ctx):
            return None

    with pytest.raises(RegistryError, match="invalid experiment name"):
        register_experiment("has space", description="d", paper="p", quick=_Cfg())(first)
    with pytest.raises(TypeError, match="quick= must be a dataclass instance"):
        register_experiment("x", description="d", paper="p", quick=_Cfg)
    with pytest.raises(TypeError, match="config= must be a dataclass type"):
        register_trainer("t", description="d", config=_Cfg())

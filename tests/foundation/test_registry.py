"""Experiment/trainer registry: discovery, lookups with suggestions, duplicate and bad registrations."""

import dataclasses
import subprocess
import sys

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


def test_a_name_must_be_a_literal_so_the_sources_tell_who_registers_it():
    source = "NAME = 'x'\n@register_experiment(NAME, description='d', paper='p', quick=None)\ndef f(cfg, ctx): ...\n"
    with pytest.raises(registry.RegistryError, match=r"mod.py:2: register_experiment\(\.\.\.\) must name"):
        registry._registered_names(source, "mod.py")
    assert registry._registered_names(source.replace("(NAME,", "('x',"), "mod.py") == [("experiment", "x")]


def test_source_index_names_the_module_that_registers_each_name():
    idx = registry.index()
    assert {n: e.fn.__module__ for n, e in registry.experiments().items()} == idx.experiment
    assert {n: t.fn.__module__ for n, t in registry.trainers().items()} == idx.trainer
    assert registry.experiment_names() == sorted(idx.experiment)
    assert registry.trainer_names() == ["gui-agent", "lm", "posttrain", "rl", "vlm"]


def test_scan_reads_decorators_and_plain_calls():
    source = """
import jaxlab.registry as registry
from jaxlab.registry import register_experiment, register_trainer

@register_experiment("fig-1", description="d", paper="p", quick=Cfg())
def fig(cfg, ctx): ...

@registry.register_trainer("tr", description="d", config=Cfg)
def tr(cfg, out): ...

register_experiment("fig-2", description="d", paper="p", quick=Cfg())(fig)
"""
    assert registry._registered_names(source, "<test>") == [
        ("experiment", "fig-1"), ("trainer", "tr"), ("experiment", "fig-2")]


def test_a_lookup_imports_only_the_module_it_needs():
    # `jaxlab train lm` must not pay for gymnax, distrax or matplotlib (imported by other modules).
    code = ("import sys; from jaxlab import registry; registry.get_trainer('lm'); "
            "registry.get_experiment('ssm-hippo'); "
            "print(sorted(m for m in ('gymnax', 'distrax', 'jaxlab.experiments.rl_train', "
            "'jaxlab.experiments.mqar') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[]"


def test_a_module_that_does_not_register_its_indexed_name_is_an_error(monkeypatch):
    fake = registry.SourceIndex(experiment={"ghost": "jaxlab.experiments._lm_common"}, trainer={})
    monkeypatch.setattr(registry, "index", lambda: fake)
    with pytest.raises(RegistryError, match="_lm_common names experiment 'ghost' but did not register it"):
        get_experiment("ghost")


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
